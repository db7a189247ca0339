"""`sparselora-fx inspect`: the built-in model and a local HF folder built on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparselora_fx.cli import main


def test_inspect_builtin_prints_groups(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--layers", "3"]) == 0
    out = capsys.readouterr().out
    assert "21 LoRA units, 9 groups" in out
    assert "model.layers.1.mlp" in out and "gated_mlp" in out
    assert "dense" in out  # the default preset keeps the first and last layer dense


def test_inspect_local_folder_on_meta_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Only config.json is needed: no weights are read (an 8B folder needs no 32 GB)."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2)
    cfg.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    assert main(["inspect", "--model", str(tmp_path), "--sparsity", "0.5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["units"]) == 21
    kinds = sorted(g["kind"] for g in data["groups"])
    assert kinds == ["attn_qk"] * 3 + ["attn_vo"] * 3 + ["gated_mlp"] * 3
    qk = next(g for g in data["groups"] if g["kind"] == "attn_qk")
    assert (qk["num_heads"], qk["num_kv_heads"], qk["head_dim"]) == (8, 2, 16)


def test_inspect_rejects_a_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no config.json"):
        main(["inspect", "--model", str(tmp_path)])


def test_inspect_unknown_policy_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--layers", "1", "--policy", "no-such-preset"]) == 2
    assert "no-such-preset" in capsys.readouterr().err
