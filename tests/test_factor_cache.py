"""The SVD factor cache (``sparselora_fx/factor_cache.py``): the factors' values, their binding to
the exact weight they were built from (full-content fingerprints, probe-checked files,
``refresh_factors``), where files go and what is cleaned up.

References are float64 eager computations of the best low-rank factors.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch

import sparselora_fx
from sparselora_fx import factor_cache as fc
from sparselora_fx.counters import counters
from sparselora_fx.errors import SparseLoRAError
from tests._weights import low_rank_weight


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """An empty in-memory cache and a disk folder of its own (so the once-per-folder sweep runs anew)."""
    monkeypatch.setenv("SPARSELORA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SPARSELORA_DISK_CACHE", "1")
    fc.clear_cache()
    yield
    fc.clear_cache()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _best_rank_k_error(w, k):
    s = torch.linalg.svdvals(w.double())
    return s[k:].square().sum().sqrt().item()


def test_empty_cache_dir_variable_counts_as_unset(monkeypatch, tmp_path):
    """``SPARSELORA_CACHE_DIR=""`` once wrote factor files into the current folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    for value in ("", "   "):
        monkeypatch.setenv("SPARSELORA_CACHE_DIR", value)
        assert fc.cache_dir() == tmp_path / "home" / ".cache" / "sparselora_fx"
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    assert fc.get_factors(w, 4) is not None
    assert not list(tmp_path.glob("*.safetensors"))  # nothing in the current folder
    assert list((tmp_path / "home" / ".cache" / "sparselora_fx").glob("*.safetensors"))


def _orphan(folder: Path, name: str, age_s: float) -> Path:
    path = folder / name
    path.write_bytes(b"partial")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_orphan_temp_files_of_killed_writers_are_removed_after_the_grace_period():
    folder = fc.cache_dir()
    folder.mkdir(parents=True)
    old = _orphan(folder, ".abc-r4.safetensors.x1y2.tmp", fc.ORPHAN_GRACE_SECONDS + 60)
    fresh = _orphan(folder, ".abc-r4.safetensors.z3w4.tmp", 5)  # maybe another rank's write in progress
    other = _orphan(folder, "notes.tmp", fc.ORPHAN_GRACE_SECONDS + 60)  # not a name our writer uses
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(1))
    assert fc.get_factors(w, 4) is not None  # the first write into the folder sweeps it
    assert not old.exists() and fresh.exists() and other.exists()
    assert list(folder.glob("*.safetensors"))  # and the write itself landed
    assert fc.sweep_orphans(folder, now=time.time() + fc.ORPHAN_GRACE_SECONDS + 10) == 1  # fresh, later


# ---------------------------------------------------------------------------------------------
# Factors: values and the private RNG


def test_factors_match_float64_truncated_svd():
    w = low_rank_weight(16, 12, seed=15)
    p, q = fc.get_factors(w, 4)
    assert p.shape == (12, 4) and q.shape == (4, 16) and p.dtype == w.dtype
    u, s, vh = torch.linalg.svd(w.double().t(), full_matrices=False)
    torch.testing.assert_close((p @ q).double(), (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-4, atol=1e-5)


def test_factors_stored_in_model_dtype():
    w = low_rank_weight(16, 12, seed=16).to(torch.bfloat16)
    p, q = fc.get_factors(w, 4)
    assert p.dtype == q.dtype == torch.bfloat16


def test_randomized_svd_leaves_global_rng_unchanged(monkeypatch):
    w = low_rank_weight(300, 260, seed=17)  # > SMALL_WEIGHT_NUMEL and rank << min(shape)
    calls = []
    real = torch.svd_lowrank
    monkeypatch.setattr(torch, "svd_lowrank", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(1234)
    expected = torch.rand(8)
    torch.manual_seed(1234)
    p1, q1 = fc.compute_factors(w, 8)
    after = torch.rand(8)
    assert calls, "the randomized path was not taken"
    assert torch.equal(after, expected)
    torch.manual_seed(999)  # different global state: factors must not depend on it
    p2, q2 = fc.compute_factors(w, 8)
    assert torch.equal(p1, p2) and torch.equal(q1, q2)
    err = torch.linalg.matrix_norm(w.double().t() - (p1 @ q1).double()).item()
    assert err <= 1.01 * _best_rank_k_error(w, 8) + 1e-6


# ---------------------------------------------------------------------------------------------
# Factor cache


def _files(path):
    return sorted(os.listdir(path)) if path.exists() else []


def _cache_path():
    return fc.cache_dir()


def test_memory_hit_and_stats():
    w = low_rank_weight(16, 12, seed=18)
    a = fc.get_factors(w, 4)
    b = fc.get_factors(w, 4)
    assert a[0] is b[0] and a[1] is b[1]
    stats = fc.cache_stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)
    assert stats.bytes_in_memory == (12 * 4 + 4 * 16) * 4
    assert stats.build_seconds > 0


def test_value_keyed_cache_survives_new_storage():
    """FSDP2 regathers (new storage, same values): still a hit; data_ptr is not the key."""
    w = low_rank_weight(16, 12, seed=19)
    a = fc.get_factors(w, 4)
    b = fc.get_factors(w.clone(), 4)
    assert a[0] is b[0]
    assert fc.cache_stats().hits == 1


def _fingerprints() -> int:
    return counters["sparselora"]["fingerprints_computed"]


def test_fingerprint_memoised_per_version():
    w = low_rank_weight(16, 12, seed=20)
    counters.clear()
    fc.get_factors(w, 4)
    fc.get_factors(w, 4)
    fc.get_factors(w, 2)
    assert _fingerprints() == 1
    with torch.no_grad():
        w.add_(1.0)
    fc.get_factors(w, 4)
    assert _fingerprints() == 2


def test_fingerprint_memo_covers_fresh_views_and_dies_with_the_weight():
    """The rewrite passes `W.t()` (a new view object each step): still one host hash."""
    import gc

    w = low_rank_weight(200, 100, seed=35)
    counters.clear()
    fps = {fc.fingerprint(w.t()) for _ in range(3)}
    assert _fingerprints() == 1 and len(fps) == 1
    # same values and shape, contiguous or not: one fingerprint (one cache entry, one file)
    assert fps == {fc._compute_fingerprint(w.t().contiguous())}
    assert fc.fingerprint(w) != fps.pop()  # the other orientation is another weight
    p, q = fc.get_factors(w.t(), 4)
    assert p.shape == (200, 4) and q.shape == (4, 100)
    with torch.no_grad():
        w[0, 0] += 1.0  # the view shares the version counter
    fc.fingerprint(w.t())
    assert _fingerprints() == 3
    del w
    gc.collect()
    assert fc._STATE.memo == {}


def test_changed_weight_gets_new_factors():
    w = low_rank_weight(16, 12, seed=21)
    p1, q1 = fc.get_factors(w, 4)
    with torch.no_grad():
        w.copy_(low_rank_weight(16, 12, seed=22))
    p2, q2 = fc.get_factors(w, 4)
    expected = fc.compute_factors(w, 4)
    assert not torch.equal(p1 @ q1, p2 @ q2)
    torch.testing.assert_close(p2 @ q2, expected[0] @ expected[1])


def test_disk_round_trip(monkeypatch):
    w = low_rank_weight(16, 12, seed=23)
    p, q = fc.get_factors(w, 4)
    files = _files(_cache_path())
    assert files == [f"{fc.fingerprint(w)}-r4.safetensors"]
    fc.clear_cache()
    monkeypatch.setattr(fc, "compute_factors", lambda *a: pytest.fail("rebuilt despite disk cache"))
    p2, q2 = fc.get_factors(w, 4)
    assert torch.equal(p, p2) and torch.equal(q, q2)
    assert fc.cache_stats().disk_hits == 1


def test_disk_cache_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("SPARSELORA_DISK_CACHE", "0")
    assert fc.get_factors(low_rank_weight(16, 12, seed=24), 4) is not None
    assert _files(_cache_path()) == []


def _write_then_forget(w, rank=4):
    fc.get_factors(w, rank)
    fc.clear_cache()
    return _cache_path() / f"{fc.fingerprint(w)}-r{rank}.safetensors"


def _assert_rebuilt(w, caplog, rank=4):
    with caplog.at_level(logging.WARNING, logger="sparselora_fx"):
        p, q = fc.get_factors(w, rank)
    assert "ignoring factor cache file" in caplog.text
    stats = fc.cache_stats()
    assert stats.rejected_files == 1 and stats.disk_hits == 0
    ref = fc.compute_factors(w, rank)
    torch.testing.assert_close(p @ q, ref[0] @ ref[1])
    # the rebuilt file is valid again
    fc.clear_cache()
    fc.get_factors(w, rank)
    assert fc.cache_stats().disk_hits == 1


def test_truncated_file_is_rebuilt(caplog):
    w = low_rank_weight(16, 12, seed=25)
    path = _write_then_forget(w)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_rebuilt(w, caplog)


def test_foreign_file_is_rebuilt(caplog):
    from safetensors.torch import save_file

    w = low_rank_weight(16, 12, seed=26)
    path = _write_then_forget(w)
    save_file({"P": torch.zeros(12, 4), "Q": torch.zeros(4, 16)}, str(path))  # no metadata
    _assert_rebuilt(w, caplog)


def test_mismatching_file_is_rebuilt(caplog):
    from safetensors.torch import save_file

    w = low_rank_weight(16, 12, seed=27)
    path = _write_then_forget(w)
    meta = fc._metadata(w, fc.fingerprint(w), 4)
    save_file({"P": torch.zeros(12, 3), "Q": torch.zeros(3, 16)}, str(path), metadata=meta)
    _assert_rebuilt(w, caplog)


def test_garbage_file_is_rebuilt(caplog):
    w = low_rank_weight(16, 12, seed=28)
    path = _write_then_forget(w)
    path.write_bytes(b"not a safetensors file at all")
    _assert_rebuilt(w, caplog)


def test_atomic_write_leaves_no_temp_files(monkeypatch):
    import safetensors.torch

    for seed in (29, 30):
        fc.get_factors(low_rank_weight(16, 12, seed=seed), 4)
    assert all(f.endswith(".safetensors") and not f.startswith(".") for f in _files(_cache_path()))
    assert len(_files(_cache_path())) == 2

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    w = low_rank_weight(16, 12, seed=31)
    assert fc.get_factors(w, 4) is not None  # a failed write never stops training
    assert len(_files(_cache_path())) == 2  # neither a final nor a temporary file


def test_nan_weight_returns_none_and_warns_once():
    w = low_rank_weight(16, 12, seed=32)
    w[3, 4] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"\(16, 12\)"):
        assert fc.get_factors(w, 4) is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fc.get_factors(w, 4) is None
    assert fc.cache_stats().unusable == 1
    assert _files(_cache_path()) == []


def test_meta_weight_returns_none_silently():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fc.get_factors(torch.empty(16, 12, device="meta"), 4) is None
    assert fc.cache_stats().misses == 0


def test_prepare_factors_reports_usable():
    good = low_rank_weight(16, 12, seed=33)
    bad = low_rank_weight(16, 12, seed=34)
    bad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning):
        result = fc.prepare_factors([("a.weight", good), ("b.weight", bad)], 4, progress=False)
    assert result == {"a.weight": True, "b.weight": False}
    assert fc.get_factors(good, 4) is not None and fc.cache_stats().hits == 1


def test_get_factors_rejects_non_matrix():
    with pytest.raises(SparseLoRAError, match="2-D"):
        fc.get_factors(torch.zeros(3), 4)


# ---------------------------------------------------------------------------------------------
# Factors are bound to the exact weight they were built from


def _columns_a_sampled_hash_read(rows: int, cols: int, samples: int = 16384) -> set[int]:
    """The columns the former fingerprint read: `samples` values at `(i (n - 1)) // (samples - 1)`."""
    n = rows * cols
    pos = (torch.arange(samples, dtype=torch.int64) * (n - 1)) // (samples - 1)
    return set((pos % cols).tolist())


def test_weights_differing_only_in_columns_a_sampled_hash_skips_get_their_own_factors():
    a = torch.randn(512, 512, generator=_gen(40))
    skipped = sorted(set(range(512)) - _columns_a_sampled_hash_read(512, 512))
    assert len(skipped) == 31  # the reported case: these columns were never hashed
    b = a.clone()
    b[:, skipped] += 3.0 * torch.randn(512, len(skipped), generator=_gen(41))
    assert fc.fingerprint(a) != fc.fingerprint(b)
    pa, qa = fc.get_factors(a, 4)
    pb, qb = fc.get_factors(b, 4)
    stats = fc.cache_stats()
    assert (stats.entries, stats.hits, stats.misses) == (2, 0, 2)
    for w, (p, q) in ((a, (pa, qa)), (b, (pb, qb))):
        ref = fc.compute_factors(w, 4)
        assert torch.equal(p, ref[0]) and torch.equal(q, ref[1])
    assert (pa @ qa - pb @ qb).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fingerprint_is_a_hash_of_every_byte_whatever_the_block_size(monkeypatch, dtype):
    import hashlib

    w = torch.randn(37, 20, generator=_gen(42)).to(dtype)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(w.shape)}|{w.dtype}|{w.numel()}|full|".encode())
    h.update(w.contiguous().view(torch.uint8).numpy().tobytes())
    name = f"37x20-{str(dtype).removeprefix('torch.')}-{h.hexdigest()}"
    assert fc._compute_fingerprint(w) == name
    whole_t = fc._compute_fingerprint(w.t())
    monkeypatch.setattr(fc, "HASH_BLOCK_BYTES", 3 * 20 * w.element_size() + 1)  # blocks of 3 rows, last of 1
    assert fc._compute_fingerprint(w) == name
    assert fc._compute_fingerprint(w.t()) == whole_t == fc._compute_fingerprint(w.t().contiguous())
    last_bit = w.clone()
    last_bit.view(torch.int16 if dtype == torch.bfloat16 else torch.int32).view(-1)[-1] ^= 1
    assert fc._compute_fingerprint(last_bit) != name


def _forge(source: Path, target: Path, fingerprint: str) -> dict[str, torch.Tensor]:
    """Copy `source`'s factors and metadata to `target`, claiming `fingerprint`: every name and
    metadata claim then matches the target weight, the factors (and probe errors) are another's."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(target), metadata={**meta, "fingerprint": fingerprint})
    return tensors


def test_a_cache_file_carrying_another_weights_factors_is_rejected_and_rebuilt(caplog):
    a = low_rank_weight(40, 24, seed=43)
    b = a.clone()
    b[:, 5] += 0.2 * torch.randn(40, generator=_gen(44))  # a near neighbour: one column differs
    fc.get_factors(a, 4)
    fp_b = fc.fingerprint(b)
    path_b = fc.cache_dir() / f"{fp_b}-r4.safetensors"
    foreign = _forge(fc.cache_dir() / f"{fc.fingerprint(a)}-r4.safetensors", path_b, fp_b)
    from safetensors import safe_open

    with safe_open(str(path_b), framework="pt") as f:
        claims = dict(f.metadata())
    assert {k: v for k, v in claims.items() if k != "probe_errors"} == fc._metadata(b, fp_b, 4)
    fc.clear_cache()
    counters.clear()
    with caplog.at_level(logging.WARNING, logger="sparselora_fx"):
        p, q = fc.get_factors(b, 4)
    assert "factors are not this weight's" in caplog.text
    stats = fc.cache_stats()
    assert (stats.rejected_files, stats.disk_hits) == (1, 0)
    assert counters["sparselora"]["factor_cache_rejected_files"] == 1
    ref = fc.compute_factors(b, 4)
    assert torch.equal(p, ref[0]) and torch.equal(q, ref[1])
    assert not torch.equal(p @ q, foreign["P"] @ foreign["Q"])
    fc.clear_cache()  # the rebuilt file is b's own: read back, not rejected
    p2, q2 = fc.get_factors(b, 4)
    assert (fc.cache_stats().disk_hits, fc.cache_stats().rejected_files) == (1, 0)
    assert torch.equal(p2, p) and torch.equal(q2, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_files_probe_errors_are_measured_again_on_load(dtype):
    """The numbers stored at build time are those the check recomputes against the same weight."""
    from safetensors import safe_open

    w = torch.randn(300, 260, generator=_gen(45)).to(dtype)  # the randomized SVD path
    p, q = fc.get_factors(w, 8)
    with safe_open(str(fc.cache_dir() / f"{fc.fingerprint(w)}-r8.safetensors"), framework="pt") as f:
        stored = [float(v) for v in f.metadata()["probe_errors"].split(",")]
    assert stored == fc.probe_errors(w, p, q) and len(stored) == fc.PROBES
    assert all(0.0 < e < 1.0 for e in stored)  # a rank-8 estimate of a flat spectrum: a rough one
    exact = fc.compute_factors(w.float()[:40, :30], 30)  # full rank: nothing missed
    assert max(fc.probe_errors(w.float()[:40, :30], *exact)) < 1e-5


def _frozen_linear(out_f: int, in_f: int, seed: int) -> torch.nn.Linear:
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(low_rank_weight(out_f, in_f, seed))
    lin.weight.requires_grad_(False)
    return lin


@pytest.mark.parametrize("write", ["data.copy_", "data ="])
def test_data_writes_into_a_frozen_weight_need_refresh_factors(write):
    model = torch.nn.Sequential(_frozen_linear(16, 12, seed=46), _frozen_linear(12, 16, seed=47))
    changed, kept = model[0].weight, model[1].weight
    old = fc.get_factors(changed, 4)
    old_rows = fc.get_factors(changed[:8], 4)  # a fused part's rows: a view of the parameter
    old_kept = fc.get_factors(kept, 4)
    new = low_rank_weight(16, 12, seed=48)
    version = changed._version
    if write == "data.copy_":
        changed.data.copy_(new)
    else:
        changed.data = new.clone()
    assert changed._version == version  # a `.data` write is invisible to the version counter
    # The documented limit (README, docs/policy.md): without refresh_factors the old factors stay.
    assert fc.get_factors(changed, 4)[0] is old[0]
    assert fc.get_factors(changed[:8], 4)[0] is old_rows[0]
    counters.clear()
    assert sparselora_fx.refresh_factors(model) == 3  # changed, its rows, kept
    for weight, ref in ((changed, fc.compute_factors(new, 4)), (changed[:8], fc.compute_factors(new[:8], 4))):
        p, q = fc.get_factors(weight, 4)
        assert torch.equal(p, ref[0]) and torch.equal(q, ref[1])
    assert fc.get_factors(kept, 4)[0] is old_kept[0]  # unchanged: hashed again, its factors taken back
    c = counters["sparselora"]
    assert (c["fingerprints_computed"], c["factor_cache_builds"], c["factor_cache_hits"]) == (3, 2, 1)
    sparselora_fx.refresh_factors([kept])  # the next refresh drops the factors of the old values
    assert fc.cache_stats().bytes_in_memory == sum(
        t.numel() * t.element_size() for w in (changed, changed[:8], kept) for t in fc.get_factors(w, 4))


def test_refresh_factors_of_a_model_with_sharded_parameters_forgets_every_fingerprint():
    """FSDP2's parameters are DTensor shards; the unsharded weights the steps read are other
    tensors, so a refresh cannot tell which memo entries are that model's: it forgets them all."""

    class Shard(torch.Tensor):  # stands for a DTensor: any tensor subclass
        pass

    plain = _frozen_linear(16, 12, seed=52).weight
    other = _frozen_linear(12, 16, seed=53).weight
    fc.get_factors(plain, 4)
    fc.get_factors(other, 4)
    assert sparselora_fx.refresh_factors([plain]) == 1  # plain tensors: only their own entries
    assert sparselora_fx.refresh_factors([torch.zeros(4, 4).as_subclass(Shard)]) == 1  # the rest
    assert fc._STATE.memo == {}
    counters.clear()
    fc.get_factors(plain, 4)
    fc.get_factors(other, 4)
    c = counters["sparselora"]
    # other's factors were taken back from the pool; plain's pool went at the second call: its
    # file is read back (and checked), no SVD
    assert (c["fingerprints_computed"], c["factor_cache_hits"], c["factor_cache_disk_hits"]) == (2, 1, 1)
    assert c["factor_cache_builds"] == 0


def test_load_state_dict_refreshes_the_factors_without_refresh_factors():
    model = torch.nn.Sequential(_frozen_linear(16, 12, seed=49))
    old = fc.get_factors(model[0].weight, 4)
    new = low_rank_weight(16, 12, seed=50)
    version = model[0].weight._version
    model.load_state_dict({"0.weight": new})
    assert model[0].weight._version > version  # param.copy_: the memo sees the new version
    p, q = fc.get_factors(model[0].weight, 4)
    ref = fc.compute_factors(new, 4)
    assert torch.equal(p, ref[0]) and torch.equal(q, ref[1])
    assert not torch.equal(p @ q, old[0] @ old[1])


def test_refresh_factors_gives_a_compiled_model_the_new_weights_factors_without_recompiling(monkeypatch):
    """The reported run: frozen weights rewritten through `.data` after compiling kept selecting
    channels with the old factors. After refresh_factors the next step's loss is that of a fresh
    compile of the same weights, and nothing is recompiled."""
    import copy

    import torch.nn.functional as F

    from sparselora_fx.models import build_tiny_model, tiny_batch
    from sparselora_fx.policy import Policy

    monkeypatch.setenv("SPARSELORA_DISK_CACHE", "0")
    options = {"policy": Policy(mlp=0.5, attn_qk=0.5, attn_vo=0.5, estimator={"kind": "svd", "rank": 4}),
               "inner": "aot_eager"}
    batch = tiny_batch("llama")

    def loss_of(fn) -> float:
        torch.manual_seed(0)
        logits = fn(input_ids=batch["input_ids"]).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
        loss.backward()
        return loss.item()

    model = build_tiny_model("llama", init_lora_b=True)
    fn = torch.compile(model, backend="sparselora", options=options)
    loss_of(fn)
    rewritten = counters["sparselora"]["groups_rewritten"]
    assert rewritten > 0
    g = _gen(51)
    frozen = [p for n, p in model.named_parameters() if "base_layer" in n and p.dim() == 2]
    assert frozen and not any(p.requires_grad for p in frozen)
    for p in frozen:
        p.data.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * p.std())
    stale = loss_of(fn)
    sparselora_fx.refresh_factors(model)
    fresh = loss_of(fn)
    assert counters["sparselora"]["groups_rewritten"] == rewritten  # no recompile
    reference = copy.deepcopy(model)
    fc.clear_cache()
    want = loss_of(torch.compile(reference, backend="sparselora", options=options))
    assert abs(fresh - want) <= 1e-6 * abs(want), (fresh, want)
    assert abs(stale - want) > 1e-4, (stale, want)  # the documented limit without refresh_factors
