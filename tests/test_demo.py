"""The demo runner's plumbing: data, labels, table, JSON (timings are not asserted)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from sparselora_fx.demo import CharTokenizer, DemoConfig, encode_example, generate_problems, run_demo
from sparselora_fx.demo.data import IGNORE_INDEX, BatchStream, encode_dataset, load_alpaca_json, prompt_of
from sparselora_fx.demo.runner import demo_policy
from sparselora_fx.flops import LayerShape, evaluate, flops_dense_lora


def test_generator_is_deterministic_and_correct():
    a, b = generate_problems(60, seed=3), generate_problems(60, seed=3)
    assert a == b
    assert a != generate_problems(60, seed=4)
    for rec in a:
        assert set(rec) == {"instruction", "input", "output"}
        m = re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+)\. The answer is (\d+)\.", rec["output"])
        assert m, rec["output"]
        x, op, y, ans, ans2 = m.groups()
        exact = {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y), "/": int(x) / int(y)}[op]
        assert exact == int(ans) == int(ans2)


def test_labels_mask_prompt_and_padding():
    tok = CharTokenizer()
    rec = generate_problems(1, seed=0)[0]
    ids, labels = encode_example(rec, tok, 160)
    assert len(ids) == len(labels) == 160
    n_prompt = 1 + len(prompt_of(rec))  # BOS + prompt
    n_answer = len(rec["output"]) + 1  # + EOS
    assert all(x == IGNORE_INDEX for x in labels[:n_prompt])
    assert labels[n_prompt:n_prompt + n_answer] == ids[n_prompt:n_prompt + n_answer]
    assert all(x == IGNORE_INDEX for x in labels[n_prompt + n_answer:])
    assert ids[n_prompt + n_answer:] == [tok.pad_token_id] * (160 - n_prompt - n_answer)
    assert tok.decode(labels[n_prompt:n_prompt + n_answer]) == rec["output"]


def test_truncation_keeps_the_answer():
    tok = CharTokenizer()
    rec = generate_problems(1, seed=1)[0]
    ids, labels = encode_example(rec, tok, 40)
    answer = [x for x in labels if x != IGNORE_INDEX]
    assert len(ids) == 40 and tok.decode(answer) == rec["output"]


def test_batches_are_seeded():
    data = encode_dataset(generate_problems(10), CharTokenizer(), 64)
    one = [b["input_ids"] for _, b in zip(range(4), BatchStream(data, 3, seed=5))]
    two = [b["input_ids"] for _, b in zip(range(4), BatchStream(data, 3, seed=5))]
    assert all(torch.equal(x, y) for x, y in zip(one, two))


def test_load_alpaca_json_errors_name_the_record(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"input": "x"}]))
    with pytest.raises(Exception, match="record 1"):
        load_alpaca_json(path)


def test_demo_policy_keeps_first_and_last_dense():
    p = demo_policy(4)
    assert p.resolve("model.layers.0.mlp", "gated_mlp", num_layers=4) is None
    assert p.resolve("model.layers.3.self_attn", "attn_qk", num_layers=4) is None
    assert p.resolve("model.layers.1.mlp", "gated_mlp", num_layers=4) == pytest.approx(0.9)
    assert p.resolve("model.layers.2.self_attn", "attn_vo", num_layers=4) == pytest.approx(0.5)
    assert demo_policy(2).resolve("model.layers.0.mlp", "gated_mlp", num_layers=2) == pytest.approx(0.9)


@pytest.mark.slow
def test_run_demo_plumbing(tmp_path):
    cfg = DemoConfig(steps=3, batch=2, seq=32, hidden=32, intermediate=48, heads=4, kv_heads=2, layers=3,
                     inner="eager", out=str(tmp_path), n_train=8, n_eval=3, progress=False, plot=False)
    lines: list[str] = []
    res = run_demo(cfg, echo=lines.append)

    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("config", "machine", "sides", "table", "notes"):
        assert key in saved
    # 2 timed steps per side: the figures are withheld, and the output says why
    assert not {"speedup", "speedup_fastest_steps", "ideal_speedup", "efficiency"} & set(saved)
    assert any("only 2 timed step(s) per side" in n and "not be meaningful" in n for n in saved["notes"])
    for side in ("dense", "sparselora"):
        s = saved["sides"][side]
        for key in ("step_times_s", "losses", "compile_s", "step_time_s", "tokens_per_s", "peak_mem_bytes",
                    "final_train_loss", "eval_loss", "flops_per_step"):
            assert key in s, (side, key)
        assert len(s["losses"]) == len(s["step_times_s"]) == 3
        assert all(map(lambda x: x == x, s["losses"]))  # finite, not NaN
    # the policy reached the graph: middle layer sparse, first and last dense
    assert [d["mlp"] for d in saved["sides"]["sparselora"]["sparsities"]] == [None, 0.9, None]

    # dense FLOPs: the per-layer sum equals the closed form for the whole stack
    model = res["sides"]["dense"]["model"]
    shape = LayerShape.from_hf_config(model.config, cfg.lora_rank)
    whole = evaluate(flops_dense_lora(shape, cfg.batch, cfg.seq, n_layers=cfg.layers, input_grad=False))["total"]
    assert saved["sides"]["dense"]["flops_per_step"] == whole
    assert saved["sides"]["sparselora"]["flops_per_step"] < whole

    # eval loss is the dense per-answer-token loss: recompute it in float64 through HF's own loss
    data = encode_dataset(generate_problems(11, seed=0)[8:], CharTokenizer(), cfg.seq)
    ref = model.double().eval()
    with torch.no_grad():
        total = count = 0.0
        for i in range(data["input_ids"].shape[0]):
            labels = data["labels"][i:i + 1]
            n = float((labels[:, 1:] != IGNORE_INDEX).sum())
            total += float(ref(input_ids=data["input_ids"][i:i + 1], labels=labels).loss) * n
            count += n
    assert saved["sides"]["dense"]["eval_loss"] == pytest.approx(total / count, rel=1e-5)

    text = "\n".join(lines)
    for row in ("median step time", "tokens/s", "speedup", "executed FLOPs / step", "peak memory",
                "final train loss", "eval loss (dense)"):
        assert row in text
    assert "dense LoRA" in text and "SparseLoRA" in text and "no evidence about accuracy" in text
    assert "SparseLoRA step speedup" not in text and "not be meaningful" in text
    assert "pip install matplotlib" not in text  # plot=False: no hint


def _side(times: list[float], flops: float) -> dict:
    import statistics

    timed = times[1:]
    return {"step_times_s": times, "flops_per_step": flops,
            "step_time_s": {"median": statistics.median(timed), "min": min(timed), "max": max(timed)}}


def test_speedup_figures_need_enough_timed_steps():
    """``demo --steps 2`` printed "18.19x speedup ... efficiency 9.15" from one timed step."""
    from sparselora_fx.demo.runner import MIN_TIMED_STEPS, speedup_figures

    few = speedup_figures(_side([9.0, 2.0], 4e9), _side([9.0, 0.11], 2e9))
    assert few[0] == {} and "only 1 timed step(s)" in few[1] and f"--steps {MIN_TIMED_STEPS + 1}" in few[1]
    figures, why_not = speedup_figures(_side([9.0] + [2.0] * MIN_TIMED_STEPS, 4e9),
                                       _side([9.0] + [1.0] * MIN_TIMED_STEPS, 2e9))
    assert why_not is None
    assert figures == pytest.approx({"speedup": 2.0, "speedup_fastest_steps": 2.0, "ideal_speedup": 2.0,
                                     "efficiency": 1.0})


# ------------------------------------------------------------------------ user mistakes: DemoError, no traceback


@pytest.mark.parametrize("kwargs,needle", [
    ({"steps": 1}, "--steps 1: need at least 2"),
    ({"batch": 0}, "--batch 0: need at least 1"),
    ({"seq": 4}, "--seq 4: need at least 8"),
    ({"layers": 0}, "--layers 0: the built-in model needs at least 1 layer"),
    ({"inner": "jit"}, "inner='jit'"),
    ({"sides": ("sparse",)}, "sides=('sparse',)"),
])
def test_config_check_names_the_option(kwargs, needle):
    from sparselora_fx.demo.runner import DemoError

    with pytest.raises(DemoError) as exc:
        DemoConfig(**kwargs).check()
    assert needle in str(exc.value)


def test_config_check_model_folder_without_config(tmp_path):
    from sparselora_fx.demo.runner import DemoError

    with pytest.raises(DemoError, match="no config.json"):
        DemoConfig(model=str(tmp_path)).check()


def test_load_alpaca_json_file_errors(tmp_path):
    from sparselora_fx.demo.data import DemoDataError

    binary = tmp_path / "b.json"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    for path, needle in [(tmp_path / "missing.json", "data file not found"), (tmp_path, "a folder, not a data file"),
                         (binary, "not UTF-8 text")]:
        with pytest.raises(DemoDataError, match=needle) as exc:
            load_alpaca_json(path)
        assert str(path) in str(exc.value) and "--data" in str(exc.value)


def test_load_data_fewer_examples_than_the_batch(tmp_path):
    from sparselora_fx.demo.runner import DemoError, load_data

    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 3))
    with pytest.raises(DemoError, match=r"2 training example\(s\), fewer than --batch 8; lower --batch"):
        load_data(DemoConfig(data=str(path), batch=8, seq=32), CharTokenizer())


def test_run_demo_out_is_a_file(tmp_path):
    from sparselora_fx.demo.runner import DemoError

    out = tmp_path / "results"
    out.write_text("x")
    with pytest.raises(DemoError, match="--out .*cannot create the output folder"):
        run_demo(DemoConfig(out=str(out / "sub"), progress=False))
