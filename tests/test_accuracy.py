"""The accuracy study's data, storage and statistics (the training itself is a benchmark)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from studies import accuracy as A

_OBJECTS = {
    f"mod{m}.obj{o}": [[f"Sentence {m}-{o}-{s} says something about module {m}." for s in range(4)]]
    for m in range(3) for o in range(6)
}


def test_pairs_are_balanced_and_split_by_object() -> None:
    train, evals = A.coherence_pairs(_OBJECTS, eval_fraction=0.3, seed=0)
    assert train and evals
    assert not {p.obj for p in train} & {p.obj for p in evals}
    train_text = {x for p in train for x in (p.a, p.b)}
    assert not train_text & {x for p in evals for x in (p.a, p.b)}
    for split in (train, evals):
        assert sum(p.label for p in split) * 2 == len(split)
        for p in split:
            src = _OBJECTS[p.obj][0]
            if p.label:
                assert src.index(p.b) == src.index(p.a) + 1
            else:
                assert p.b not in src  # another object's sentence
    assert A.coherence_pairs(_OBJECTS, eval_fraction=0.3, seed=0) == (train, evals)


def test_eval_pairs_with_text_copied_from_train_are_dropped() -> None:
    objs = dict(_OBJECTS)
    train, _ = A.coherence_pairs(objs, eval_fraction=0.3)
    shared = train[0].a
    victim = next(o for o in objs if A._in_eval(o, 0.3))
    objs[victim] = [[shared, "A sentence only this eval object has, long enough."]]
    _, evals = A.coherence_pairs(objs, eval_fraction=0.3)
    assert all(shared not in (p.a, p.b) for p in evals)


def test_too_few_objects_is_a_clear_error() -> None:
    with pytest.raises(A.AccuracyError, match="only 1 object\\(s\\) in the train split"):
        A.coherence_pairs({"m.a": _OBJECTS["mod0.obj0"]}, eval_fraction=0.0)


def test_stdlib_corpus_has_enough_eval_items() -> None:
    train, evals = A.coherence_pairs(eval_fraction=A.StudyConfig().eval_fraction)
    assert len(evals) >= 2000 and len(train) > len(evals)


def test_study_is_resumable_and_saves_after_each_run(tmp_path, monkeypatch) -> None:
    calls, interrupted = [], []

    def fake_train(spec, cfg, train, evals, path, sparse_eval=None):
        calls.append(spec.key)
        if len(calls) == 3 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt  # the sitting ends mid-study
        return {"key": spec.key, "selection": spec.selection, "sparsity": spec.sparsity, "seed": spec.seed,
                "accuracy": 0.5, "eval_loss": 0.7, "eval_items": 10, "train_s": 0.0}

    monkeypatch.setattr(A, "train_run", fake_train)
    monkeypatch.setattr(A, "coherence_pairs", lambda **kw: ([A.Pair("a", "b", 1, "m.x")], []))
    monkeypatch.setattr(A, "_encode", lambda tok, pairs, n: {})
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    out = tmp_path / "acc.json"
    runs = A.study_runs(seeds=(0,), selections=("random",), sparsities=(0.5, 0.9))
    cfg = A.StudyConfig(steps=3)
    with pytest.raises(KeyboardInterrupt):
        A.run_study(out, cfg, runs, model_path=tmp_path)
    assert list(A.load_results(out, cfg)) == ["dense#0", "random@0.9#0"]
    calls.clear()
    done = A.run_study(out, cfg, runs, model_path=tmp_path)
    assert calls == ["random@0.5#0"] and len(done) == 3
    # other data (another corpus): the old file is set aside, never mixed in
    monkeypatch.setattr(A, "coherence_pairs", lambda **kw: ([A.Pair("a", "c", 1, "m.x")], []))
    calls.clear()
    done = A.run_study(out, cfg, runs, model_path=tmp_path)
    assert calls == ["dense#0", "random@0.9#0", "random@0.5#0"] and len(done) == 3
    assert (tmp_path / "acc.json.stale").exists()
    # another protocol: likewise
    assert A.load_results(out, A.StudyConfig(steps=4)) == {}
    assert not out.exists()


def test_truncated_result_file_is_set_aside(tmp_path) -> None:
    out = tmp_path / "acc.json"
    out.write_text('{"format": "sparselora-accuracy/2", "runs": {', encoding="utf-8")
    assert A.load_results(out, A.StudyConfig()) == {}
    assert (tmp_path / "acc.json.stale").read_text(encoding="utf-8").startswith('{"format"')


def test_summary_intervals() -> None:
    runs = {f"dense#{s}": {"selection": "dense", "sparsity": None, "seed": s, "accuracy": a,
                           "eval_loss": 0.5, "eval_items": 1000} for s, a in enumerate((0.80, 0.82, 0.84))}
    (row,) = A.summarize(runs)
    assert row["mean"] == pytest.approx(0.82)
    # t(0.975, 2) * sd / sqrt(3), sd = 0.02
    assert row["ci_seeds"][1] - row["mean"] == pytest.approx(4.303 * 0.02 / math.sqrt(3))
    lo, hi = row["ci_items"]  # Wilson on 3000 items around 0.82
    assert lo < 0.82 < hi and hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.82 * 0.18 / 3000), rel=0.01)
    assert "| dense" in A.to_markdown([row])


def test_unknown_selection_is_an_error() -> None:
    with pytest.raises(A.AccuracyError, match="unknown selection 'magic'"):
        A._policy(A.RunSpec("magic", 0.5, 0), 250)
    policy = A._policy(A.RunSpec("random", 0.9, 1), 250)
    assert policy.estimator_for("mlp").kind == "random" and policy.estimator_for("mlp").seed == 1


def test_merge_adds_runs_of_other_files_and_refuses_foreign_ones(tmp_path) -> None:
    cfg = A.StudyConfig()
    run = {"selection": "dense", "sparsity": None, "accuracy": 0.6, "eval_loss": 0.6, "eval_items": 10}
    A._save(tmp_path / "a.json", cfg, {"dense#0": {**run, "seed": 0}}, {"eval_items": 10}, "d1")
    A._save(tmp_path / "b.json", cfg, {"dense#1": {**run, "seed": 1}, "dense#0": {**run, "seed": 0, "accuracy": 0.1}},
            {"eval_items": 10}, "d1")
    done = A.merge_results(tmp_path / "a.json", cfg, [tmp_path / "b.json"])
    assert sorted(done) == ["dense#0", "dense#1"] and done["dense#0"]["accuracy"] == 0.6  # out's copy wins
    assert A.load_results(tmp_path / "a.json", cfg) == done
    A._save(tmp_path / "c.json", A.StudyConfig(steps=1), {"dense#2": {**run, "seed": 2}}, {}, "d1")
    with pytest.raises(A.AccuracyError, match="no finished runs of this protocol"):
        A.merge_results(tmp_path / "a.json", cfg, [tmp_path / "c.json"])
    A._save(tmp_path / "d.json", cfg, {"dense#2": {**run, "seed": 2}}, {}, "d2")
    with pytest.raises(A.AccuracyError, match="other data \\(fingerprint d2\\)"):
        A.merge_results(tmp_path / "a.json", cfg, [tmp_path / "d.json"])
    assert sorted(A.load_results(tmp_path / "a.json", cfg, "d1")) == ["dense#0", "dense#1"]


def test_data_fingerprint_sees_any_change() -> None:
    train, evals = A.coherence_pairs(_OBJECTS, eval_fraction=0.3, seed=0)
    fp = A.data_fingerprint(train, evals)
    assert fp == A.data_fingerprint(list(train), list(evals))
    assert fp != A.data_fingerprint(train[1:], evals)
    assert fp != A.data_fingerprint(evals, train)  # which split a pair is in matters
    flipped = [A.Pair(p.a, p.b, 1 - p.label, p.obj) for p in train]
    assert fp != A.data_fingerprint(flipped, evals)


def test_stdlib_corpus_does_not_depend_on_what_this_process_imported() -> None:
    from studies import docstring_corpus

    # In this process (torch, transformers imported) the stdlib packages have grown attributes;
    # the default corpus is collected in a fresh interpreter, so it equals a bare run's.
    objs = A.stdlib_objects()
    assert objs == A.stdlib_objects()
    mods = ["json", "textwrap", "fractions"]
    fresh = {k: v for k, v in objs.items() if k.split(".")[0] in mods}
    assert fresh == docstring_corpus.docstring_objects(mods)  # small modules: no import side effects here
    assert "distutils" not in {k.split(".")[0] for k in objs}


def test_recipe_keeps_first_and_last_layer_dense_with_a_warm_up() -> None:
    policy = A._policy(A.RunSpec("recipe", 0.75, 0), 250)
    assert policy.warmup_steps_for(250) == 25
    assert policy.estimator_for("mlp") == A._policy(A.RunSpec("token_sample", 0.75, 0), 250).estimator_for("mlp")
    got = [policy.resolve(f"encoder.layer.{i}.intermediate.dense", "mlp", num_layers=6) for i in range(6)]
    assert got == [None, 0.75, 0.75, 0.75, 0.75, None]


def test_summary_lists_seeds_in_order_whatever_the_file_order() -> None:
    runs = {f"random@0.9#{s}": {"selection": "random", "sparsity": 0.9, "seed": s, "accuracy": a,
                                "eval_loss": 0.7, "eval_items": 100} for s, a in ((2, 0.52), (0, 0.50), (1, 0.51))}
    (row,) = A.summarize(runs)
    assert row["seeds"] == [0, 1, 2] and row["accuracies"] == [0.50, 0.51, 0.52]


def _tiny_classifier() -> A.MeanPoolClassifier:
    import peft
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=128, max_position_embeddings=32)
    encoder = tf.BertModel(config, add_pooling_layer=False)
    encoder = peft.get_peft_model(encoder, peft.LoraConfig(r=2, target_modules="all-linear"))
    return A.MeanPoolClassifier(encoder, 2)


def test_sparse_evaluation_runs_every_mlp_sparse_and_leaves_the_model_as_it_was() -> None:
    import torch

    from sparselora_fx.backend import LAST_REPORTS

    model = _tiny_classifier()
    g = torch.Generator().manual_seed(1)
    enc = {"input_ids": torch.randint(0, 64, (12, 10), generator=g), "attention_mask": torch.ones(12, 10, dtype=torch.long),
           "labels": torch.randint(0, 2, (12,), generator=g)}
    enc["attention_mask"][:, 7:] = 0  # padding: excluded from the oracle's ranking
    cfg = A.StudyConfig(eval_batch=6)
    dense_acc, dense_loss = A.evaluate_accuracy(model, enc, cfg.eval_batch)
    n = len(LAST_REPORTS)
    res = A.evaluate_sparse(model, enc, cfg, "oracle", 0.75, seed=0)
    groups = [g for r in LAST_REPORTS[n:] for g in r.groups if g.kind == "mlp"]
    assert {g.sparsity for g in groups} == {0.75} and len({g.name for g in groups}) == 2
    assert res["selection"] == "oracle" and res["sparsity"] == 0.75
    assert res["eval_loss"] != pytest.approx(dense_loss, abs=1e-6)  # a quarter of each MLP: another function
    assert model.training  # evaluate_accuracy restores train mode
    assert A.evaluate_accuracy(model, enc, cfg.eval_batch) == (dense_acc, dense_loss)  # weights untouched
    with pytest.raises(A.AccuracyError, match="plain selection"):
        A.evaluate_sparse(model, enc, cfg, "recipe", 0.75, seed=0)


def test_summary_shows_the_sparse_evaluation_when_runs_have_it() -> None:
    runs = {f"token_sample@0.75#{s}": {"selection": "token_sample", "sparsity": 0.75, "seed": s, "accuracy": a,
                                        "eval_loss": 0.6, "eval_items": 100,
                                        "sparse_eval": {"selection": "token_sample", "sparsity": 0.75,
                                                        "accuracy": a + 0.1, "eval_loss": 0.5}}
            for s, a in enumerate((0.6, 0.62))}
    (row,) = A.summarize(runs)
    assert row["sparse_eval"]["mean"] == pytest.approx(0.71)
    assert "evaluated sparse %" in A.to_markdown([row]) and "71.0 (70.0 / 72.0; token_sample@0.75)" in A.to_markdown([row])


def test_dense_tail_trains_sparse_then_dense_and_evaluates_both_ways(monkeypatch) -> None:
    """train_run end to end on a tiny encoder: the backend compiles the sparse phase, a plain compile
    runs the last DENSE_TAIL of the steps, and the sparse evaluation is recorded beside the dense one."""
    import torch

    monkeypatch.setattr(A, "_build", lambda path, cfg, seed: _tiny_classifier())
    backends: list[str] = []
    counted: list[Any] = []
    real_compile = torch.compile

    class Counted:  # the compiled model, counting calls (eval/train pass through)
        def __init__(self, compiled):
            self.compiled, self.calls = compiled, 0

        def __call__(self, *a, **k):
            self.calls += 1
            return self.compiled(*a, **k)

        def eval(self):
            self.compiled.eval()

        def train(self, mode=True):
            self.compiled.train(mode)

    def recording_compile(model, backend="inductor", **kw):
        backends.append(backend)
        counted.append(Counted(real_compile(model, backend=backend, **kw)))
        return counted[-1]

    monkeypatch.setattr(torch, "compile", recording_compile)
    g = torch.Generator().manual_seed(2)
    enc = {"input_ids": torch.randint(0, 64, (16, 10), generator=g),
           "attention_mask": torch.ones(16, 10, dtype=torch.long), "labels": torch.randint(0, 2, (16,), generator=g)}
    cfg = A.StudyConfig(steps=10, batch=4, eval_batch=8)
    res = A.train_run(A.RunSpec("dense_tail", 0.75, 0), cfg, enc, enc, None, sparse_eval=("oracle", 0.75))
    # sparse training, the dense tail (one step: ceil(0.1 * 10)), then the sparse evaluation's compile
    assert backends == ["sparselora", "aot_eager", "sparselora"]
    assert [c.calls for c in counted[:2]] == [9, 1]  # 9 sparse training steps, then 1 dense
    assert len(res["loss_curve"]) == 1 and res["eval_items"] == 16
    assert res["sparse_eval"]["selection"] == "oracle" and 0 <= res["sparse_eval"]["accuracy"] <= 1
    assert A._policy(A.RunSpec("dense_tail", 0.75, 0), 10).estimator_for("mlp").kind == "token_sample"


def test_a_run_is_reproducible_dropout_included(monkeypatch) -> None:
    """Two runs of one spec give the same losses: BERT's dropout draws from the seeded global generator."""
    import torch

    def build(path, cfg, seed):
        with torch.random.fork_rng(devices=[]):  # as _build: the init leaves the global generator alone
            model = _tiny_classifier()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.5  # strong dropout: unseeded masks would change every loss
        return model

    monkeypatch.setattr(A, "_build", build)
    g = torch.Generator().manual_seed(3)
    enc = {"input_ids": torch.randint(0, 64, (16, 10), generator=g),
           "attention_mask": torch.ones(16, 10, dtype=torch.long), "labels": torch.randint(0, 2, (16,), generator=g)}
    cfg = A.StudyConfig(steps=3, batch=4, eval_batch=8)
    first = A.train_run(A.RunSpec("dense", None, 1), cfg, enc, enc, None)
    torch.rand(7)  # move the global generator, as other work in the process would
    second = A.train_run(A.RunSpec("dense", None, 1), cfg, enc, enc, None)
    assert first["final_train_loss"] == second["final_train_loss"] and first["dropout_seeded"]
    other = A.train_run(A.RunSpec("dense", None, 2), cfg, enc, enc, None)
    assert other["final_train_loss"] != first["final_train_loss"]


def test_a_variant_run_length_needs_its_own_result_file(tmp_path, capsys) -> None:
    """--steps other than the protocol's would set the study's file aside: the CLI refuses the default --out."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "accuracy_cli", Path(__file__).resolve().parent.parent / "benchmarks" / "accuracy.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with pytest.raises(SystemExit):
        cli.main(["--steps", "500", "--summary-only"])
    assert "give it its own --out" in capsys.readouterr().err
    assert cli.main(["--steps", "500", "--summary-only", "--out", str(tmp_path / "long.json")]) == 0
    assert '"steps": 500' in (tmp_path / "long.md").read_text()
