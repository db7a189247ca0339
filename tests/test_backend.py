"""The backend's public contract: registration, options, errors, and the fresh-interpreter path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sparselora_fx
from sparselora_fx.errors import OptionsError, PolicyError
from sparselora_fx.models import build_tiny_model, tiny_batch
from sparselora_fx.settings import INNER_COMPILERS, Settings, option_docs

REPO = Path(__file__).resolve().parents[1]


def test_entry_point_is_declared_and_resolves() -> None:
    from importlib.metadata import entry_points

    eps = entry_points(group="torch_dynamo_backends")
    assert "sparselora" in eps.names
    assert eps["sparselora"].load() is sparselora_fx.backend.sparselora_backend


def test_import_then_lookup_registers_once() -> None:
    """Importing us and then resolving the name by string must not hit Dynamo's duplicate-name assert."""
    code = textwrap.dedent("""
        import torch
        import sparselora_fx            # import first ...
        import sparselora_fx            # ... twice
        from torch._dynamo.backends.registry import lookup_backend
        fn = lookup_backend("sparselora")  # ... then by name (entry point)
        assert fn is sparselora_fx.backend.sparselora_backend
        assert "sparselora" in torch._dynamo.list_backends()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


@pytest.mark.inductor
def test_fresh_interpreter_trains_with_backend_name_equal_to_inductor(tmp_path: Path) -> None:
    """A script that never imports sparselora_fx compiles a PEFT Llama by backend name and trains 2 steps."""
    script = textwrap.dedent("""
        import sys, torch, peft, transformers as tf
        def run(backend):
            torch._dynamo.reset()
            torch.manual_seed(0)
            cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
            model = peft.get_peft_model(tf.LlamaForCausalLM(cfg),
                                        peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
            step = torch.compile(model, backend=backend)
            ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
            losses = []
            for _ in range(2):
                loss = step(input_ids=ids, labels=ids).loss
                loss.backward(); opt.step(); opt.zero_grad()
                losses.append(loss.item())
            return losses
        ours, ref = run("sparselora"), run("inductor")
        assert "sparselora_fx" in sys.modules  # loaded by the entry point, not by this script
        for a, b in zip(ours, ref):
            assert abs(a - b) <= 1e-5 * abs(b), (ours, ref)
        print("losses", ours, ref)
    """)
    assert "import sparselora_fx" not in script
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR",
                                                                    str(tmp_path / "inductor"))}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "losses" in out.stdout


def test_unknown_option_key_lists_choices() -> None:
    with pytest.raises(OptionsError) as err:
        Settings.from_options({"sparsty": 0.5})
    msg = str(err.value)
    assert "'sparsty'" in msg and "Did you mean 'sparsity'" in msg
    for key in option_docs():
        assert key in msg


def test_unknown_inner_lists_choices() -> None:
    with pytest.raises(OptionsError) as err:
        Settings.from_options({"inner": "inductr"})
    msg = str(err.value)
    assert "'inductr'" in msg and "Did you mean 'inductor'" in msg
    for name in INNER_COMPILERS:
        assert name in msg


def test_policy_path_that_does_not_exist() -> None:
    with pytest.raises(PolicyError) as err:
        Settings.from_options({"policy": "no/such/policy.toml"})
    assert "no/such/policy.toml" in str(err.value)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.2, "half", True])
def test_sparsity_outside_range_names_the_value(bad: object) -> None:
    with pytest.raises(OptionsError) as err:
        Settings.from_options({"sparsity": bad})
    assert repr(bad) in str(err.value)


def test_options_errors_surface_through_torch_compile() -> None:
    model = build_tiny_model("llama", num_layers=1)
    with pytest.raises(Exception) as err:
        torch.compile(model, backend="sparselora", options={"bogus": 1})(**tiny_batch("llama"))
    assert "unknown sparselora option 'bogus'" in str(err.value)


def test_inductor_patches_need_inductor() -> None:
    with pytest.raises(OptionsError, match="options\\['inner'\\] is 'eager'"):
        Settings.from_options({"inner": "eager", "inductor": {"max_autotune": True}})


def test_sparsity_overrides_policy_sparsities_only() -> None:
    s = Settings.from_options({"policy": "llama3-8b-math10k", "sparsity": 0.25})
    assert s.policy.resolve("model.layers.0.mlp.gate_proj", "mlp") == 0.25
    assert s.policy.resolve("model.layers.31.self_attn.q_proj", "attn_qk") == 0.25
    assert s.policy.tokens == "output_dense"  # kept from the preset


def test_identity_when_dense_equals_plain_compile() -> None:
    """A dense policy leaves the graph alone: eager-inner results equal the uncompiled model exactly."""
    model = build_tiny_model("llama", init_lora_b=True)
    batch = tiny_batch("llama")
    ref = model(**batch).loss
    got = torch.compile(model, backend="sparselora", options={"policy": "dense", "inner": "eager"})(**batch).loss
    assert torch.equal(ref, got)


def test_dump_dir_writes_graphs_and_report(tmp_path: Path) -> None:
    model = build_tiny_model("llama", num_layers=1)
    opts = {"sparsity": 0.5, "inner": "eager", "dump_dir": str(tmp_path)}
    torch.compile(model, backend="sparselora", options=opts)(**tiny_batch("llama")).loss.backward()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.endswith("_find_units_before.txt") for n in names)
    assert any(n.endswith("_rewrite_after.txt") for n in names)
    report = next(p for p in tmp_path.iterdir() if p.name.endswith("_report.json"))
    import json

    data = json.loads(report.read_text())
    assert len(data["units"]) == 7 and len(data["groups"]) == 3
    after = next(p for p in tmp_path.iterdir() if p.name.endswith("_rewrite_after.txt")).read_text()
    assert "sparselora.select_mlp" in after and "sparselora.rows_linear" in after


# ---- sparse or dense: gradients decide, not model.eval() -----------------------------------------


@pytest.mark.parametrize("training, grad, sparse_eval, sparse", [
    pytest.param(True, True, False, True, id="train-grad-sparse"),
    pytest.param(False, True, False, True, id="eval-grad-sparse"),  # gradients decide, not eval()
    pytest.param(False, False, False, False, id="eval-no_grad-dense"),
    pytest.param(False, True, True, True, id="eval-grad-sparse_eval-sparse"),
    pytest.param(False, False, True, True, id="eval-no_grad-sparse_eval-sparse"),
    pytest.param(True, False, False, False, id="train-no_grad-dense"),
])
def test_graph_runs_sparse_when_gradients_are_on_or_sparse_eval_whatever_the_training_mode(
        training: bool, grad: bool, sparse_eval: bool, sparse: bool) -> None:
    """The documented rule (README "### Options", ``sparse_eval``): gradients or sparse_eval, not
    ``model.eval()``: a backend is not shown the training flag, and Dynamo retraces on train()/eval()
    only when the forward reads ``self.training``."""
    from sparselora_fx import backend
    from sparselora_fx.counters import record_selections

    model = build_tiny_model("llama", num_layers=1).train(training)
    options = {"inner": "aot_eager", "sparsity": 0.5, "progress": False}
    if sparse_eval:
        options["sparse_eval"] = True
    backend.LAST_REPORTS.clear()
    with torch.set_grad_enabled(grad), record_selections() as rec:
        torch.compile(model, backend="sparselora", options=options)(**tiny_batch("llama"))
    report = backend.LAST_REPORTS[-1]
    assert len(report.groups) == 3 and all(g.sparsity == 0.5 for g in report.groups)
    dense_note = any("gradients are off: the graph runs dense" in n for n in report.notes)
    assert dense_note is not sparse, report.notes
    assert bool(rec.picks) is sparse  # the sparse ops ran (or not) in the compiled step


# ---- errors the user can fix surface as themselves -------------------------------------------------


def test_oserror_while_the_passes_run_is_raised_not_turned_dense(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk under dump_dir is the user's to fix: it is raised, never 'this graph runs dense'."""
    import errno
    import warnings

    from sparselora_fx import dump

    def disk_full(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setenv("SPARSELORA_STRICT", "0")  # strict mode would re-raise any failure anyway
    monkeypatch.setattr(dump, "atomic_write", disk_full)
    model = build_tiny_model("llama", num_layers=1)
    opts = {"sparsity": 0.5, "inner": "aot_eager", "progress": False, "dump_dir": str(tmp_path)}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="sparselora: this graph runs dense")
        with pytest.raises(Exception) as err:
            torch.compile(model, backend="sparselora", options=opts)(**tiny_batch("llama"))
    inner = getattr(err.value, "inner_exception", err.value)
    assert isinstance(inner, OSError) and inner.errno == errno.ENOSPC, repr(err.value)
    assert "runs dense" not in str(err.value)


def test_unusable_dump_dir_is_an_options_error_through_torch_compile(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    model = build_tiny_model("llama", num_layers=1)
    with pytest.raises(Exception) as err:
        torch.compile(model, backend="sparselora",
                      options={"sparsity": 0.5, "dump_dir": tmp_path / "file"})(**tiny_batch("llama"))
    assert "options['dump_dir']" in str(err.value) and "is a file, not a folder" in str(err.value)
