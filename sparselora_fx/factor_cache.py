"""Low-rank SVD factors of frozen weights, computed once and cached in memory and on disk.

Why a cache of its own: the SVD estimator needs `P [in, k]`, `Q [k, out]` with `x P Q ~ x W^T`
for every frozen weight. Computing them costs seconds on big weights, so they are built once.
The cache key must survive FSDP2 (which refills unsharded storage every step, so `data_ptr`
changes) and DDP (every rank holds its own copy): it is a *content fingerprint* (shape, dtype and a
blake2b hash of every byte of the values, in row-major order) plus the rank, so factors are bound
to the exact weight they were built from. The fingerprint is memoised per (owner of the values,
view geometry, `_version`) through a weakref, so it is computed on the host once per weight
version, and an in-place update (which bumps `_version`, as `load_state_dict` does) never yields
stale factors. A write through `.data` (`p.data.copy_(new)`) does not bump `_version`: after one,
call `refresh_factors(model)`, or the memoised fingerprint, and so the old factors, stay in use.

On disk (directory `SPARSELORA_CACHE_DIR`, default `~/.cache/sparselora_fx`; set
`SPARSELORA_DISK_CACHE=0` to turn it off) factors live in safetensors files named by the
fingerprint, written atomically, with metadata recording what they are and, as a check that does
not trust the name or the metadata, the relative errors `||x P Q - x W^T|| / ||x W^T||` of a few
seeded probe vectors `x`, measured at build time. On load the errors are measured again against
the actual weight: factors of another weight miss by far more than `PROBE_TOLERANCE`. Anything that
does not match is logged, counted (`factor_cache_rejected_files`), ignored and rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Iterable
from pathlib import Path

import torch

from .counters import counters

__all__ = [
    "CacheStats",
    "FORMAT_TAG",
    "cache_dir",
    "cache_stats",
    "clear_cache",
    "compute_factors",
    "disk_cache_enabled",
    "effective_rank",
    "fingerprint",
    "get_factors",
    "has_values",
    "prepare_factors",
    "probe_errors",
    "refresh_factors",
]

log = logging.getLogger("sparselora_fx")

#: Stored in every file's metadata; a file without it is foreign (v2: full-content fingerprints
#: and probe errors; v1 files have other names and are never read).
FORMAT_TAG = "sparselora_fx.svd_factors.v2"
#: Fixed seed of the randomized SVD: the same weight always gets the same factors.
SVD_SEED = 0x5EED
#: The fingerprint hashes the values in blocks of rows of at most this many bytes, each copied to a
#: reused host buffer: the extra host memory stays small whatever the weight's size.
HASH_BLOCK_BYTES = 8 << 20
#: Probe vectors of the on-load check: how many, their seed, and how far the errors measured on load
#: may be from those stored (both computed in float64, so device and BLAS differences are ~1e-12;
#: another weight's factors are off by about the share of its output energy they capture).
PROBES = 4
PROBE_SEED = 0x9B0BE5
PROBE_TOLERANCE = 1e-6
#: The probe products read the weight in float64 blocks of rows of at most this many elements.
PROBE_BLOCK_NUMEL = 1 << 21
#: Weights with at most this many elements get an exact SVD (fast anyway, and exact).
SMALL_WEIGHT_NUMEL = 1 << 16
#: Extra columns for the randomized range finder, and its power iterations.
OVERSAMPLE = 8
POWER_ITERS = 4


@dataclasses.dataclass(frozen=True)
class CacheStats:
    """What the factor step cost, for `inspect`: time building, memory held, hits and misses."""

    build_seconds: float
    bytes_in_memory: int
    entries: int
    hits: int
    misses: int
    disk_hits: int
    disk_writes: int
    rejected_files: int
    unusable: int


class _State:
    """Process-wide cache state; one lock guards it all."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        # (fingerprint, rank, device) -> (P, Q) or None (factors not finite: the SVD estimator token-samples instead)
        self.factors: dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor] | None] = {}
        # id(values owner) -> (weakref to it, {view geometry: (_version, fingerprint)})
        self.memo: dict[int, tuple[weakref.ref, dict[tuple, tuple[int, str]]]] = {}
        # Entries `refresh_factors` took out of `factors`: a weight found unchanged after the
        # refresh takes its entry back (no SVD); the pool is dropped at the next refresh.
        self.retired: dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor] | None] = {}
        self.warned: set[str] = set()
        self.write_failed: set[str] = set()  # directories already reported unwritable
        self.build_seconds = 0.0
        self.hits = 0
        self.misses = 0
        self.disk_hits = 0
        self.disk_writes = 0
        self.rejected_files = 0


_STATE = _State()


DEFAULT_CACHE_DIR = "~/.cache/sparselora_fx"
#: A ``*.tmp`` file older than this was left by a killed writer (a write takes well under a second).
ORPHAN_GRACE_SECONDS = 3600.0
_SWEPT: set[str] = set()


def cache_dir() -> Path:
    """Where factor files go; read from the environment on every call so tests can move it.

    An empty ``SPARSELORA_CACHE_DIR`` counts as unset (``Path("")`` would be the current folder).
    """
    value = os.environ.get("SPARSELORA_CACHE_DIR", "").strip()
    return Path(value or DEFAULT_CACHE_DIR).expanduser()


def sweep_orphans(folder: Path, *, now: float | None = None) -> int:
    """Delete the ``.*.tmp`` files killed writers left in ``folder`` past the grace period; how many.

    Why: a writer killed between ``mkstemp`` and ``os.replace`` leaves its temporary file behind,
    and nothing else would ever remove it. A file younger than ``ORPHAN_GRACE_SECONDS`` may belong
    to a writer still at work (another rank), so it stays.
    """
    now = time.time() if now is None else now
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file(follow_symlinks=False)):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime > ORPHAN_GRACE_SECONDS:
                os.unlink(entry.path)
                removed += 1
        except OSError:  # gone already, or not ours to remove
            continue
    return removed


def disk_cache_enabled() -> bool:
    """`SPARSELORA_DISK_CACHE=0` (or false/no/off) keeps factors in memory only."""
    value = os.environ.get("SPARSELORA_DISK_CACHE", "1").strip().lower()
    return value not in ("0", "false", "no", "off", "")


def effective_rank(weight_shape: tuple[int, ...] | torch.Size, rank: int) -> int:
    """The rank actually stored: a rank above min(shape) would only add zero columns."""
    return max(1, min(int(rank), min(int(s) for s in weight_shape)))


def has_values(weight: torch.Tensor, *, at_compile_time: bool = False) -> bool:
    """False for meta/fake tensors (compile-time tracing, DDPOptimizer pieces): no values yet.

    ``at_compile_time`` is for the backend, which holds the real parameters while compiling.
    """
    if weight.device.type == "meta" or (torch.compiler.is_compiling() and not at_compile_time):
        return False
    # Only plain tensors carry values: fake tensors, functional wrappers and DTensor shards are
    # subclasses (so this also keeps compile-time stand-ins out).
    return type(weight) in (torch.Tensor, torch.nn.Parameter)


def _compute_fingerprint(weight: torch.Tensor) -> str:
    """Hash shape, dtype and every value of `weight`, in row-major order of its logical shape.

    Every byte counts: two weights that differ anywhere get different fingerprints (a sampled hash
    once let weights that differ only in the columns it skipped share factors). The values are
    copied, a block of rows at a time, into a private host buffer that is hashed: never `.numpy()`
    on the weight's own storage, which would mark it non-resizable for good, and FSDP2 frees its
    unsharded parameters with `storage.resize_(0)` after each forward. A transposed view hashes
    like its contiguous copy, without being copied whole.
    """
    w = weight.detach()
    rows, cols = int(w.shape[0]), int(w.shape[1])
    n = rows * cols
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(w.shape)}|{w.dtype}|{n}|full|".encode())
    if n:
        block = max(1, HASH_BLOCK_BYTES // max(1, cols * w.element_size()))
        buf = torch.empty((min(block, rows), cols), dtype=w.dtype, device="cpu")
        flat = buf.view(-1).view(torch.uint8).numpy()  # our own buffer: safe to view
        for start in range(0, rows, block):
            part = w[start:start + block]
            buf[: part.shape[0]].copy_(part)
            h.update(memoryview(flat)[: part.shape[0] * cols * w.element_size()])
    dtype_name = str(w.dtype).removeprefix("torch.")
    shape_name = "x".join(str(int(s)) for s in w.shape)
    return f"{shape_name}-{dtype_name}-{h.hexdigest()}"


def fingerprint(weight: torch.Tensor) -> str:
    """The value fingerprint of `weight [out, in]`, memoised while the weight lives.

    The memo is keyed by the tensor that owns the values (`weight._base` for a view such as the
    `W.t()` the graph rewrite makes each step, else the weight) and the view's geometry, and is
    valid for one `_version` (shared by a view and its base, so in-place updates invalidate it).
    It is held through a weakref: no weight is kept alive by the cache.
    """
    root = weight._base if weight._base is not None else weight
    key = id(root)
    geometry = (tuple(weight.shape), tuple(weight.stride()), weight.storage_offset(), weight.dtype)
    version = weight._version
    with _STATE.lock:
        entry = _STATE.memo.get(key)
        if entry is not None and entry[0]() is root:
            hit = entry[1].get(geometry)
            if hit is not None and hit[0] == version:
                return hit[1]
    fp = _compute_fingerprint(weight)
    counters["sparselora"]["fingerprints_computed"] += 1

    def _forget(ref: weakref.ref, key: int = key) -> None:
        with _STATE.lock:
            current = _STATE.memo.get(key)
            if current is not None and current[0] is ref:
                del _STATE.memo[key]

    with _STATE.lock:
        entry = _STATE.memo.get(key)
        if entry is None or entry[0]() is not root:
            entry = (weakref.ref(root, _forget), {})
            _STATE.memo[key] = entry
        entry[1][geometry] = (version, fp)
    return fp


def _svd_device_seed(device: torch.device) -> None:
    """Seed only the generator `torch.svd_lowrank` will draw from (inside a fork_rng)."""
    if device.type == "cpu":
        torch.random.default_generator.manual_seed(SVD_SEED)
        return
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else module.current_device()
    with module.device(index):
        module.manual_seed(SVD_SEED)


def compute_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-k factors of W^T in float32, returned in the weight's dtype and device.

    W^T = U S V^T; P = U_k sqrt(S_k) [in, k], Q = sqrt(S_k) V_k^T [k, out]. A full SVD when the
    weight is small or k >= min(shape)/2 (randomized SVD gains nothing there); otherwise
    `torch.svd_lowrank` under a private, fixed-seed RNG state so the global RNG stream (dropout
    masks, data order) is exactly what it would have been without us.
    """
    out_features, in_features = int(weight.shape[0]), int(weight.shape[1])
    k = effective_rank(weight.shape, rank)
    wt = weight.detach().to(torch.float32).t()  # [in, out]
    if weight.numel() <= SMALL_WEIGHT_NUMEL or 2 * k >= min(out_features, in_features):
        u, s, vh = torch.linalg.svd(wt, full_matrices=False)
        u, s, v = u[:, :k], s[:k], vh[:k].t()
    else:
        device = weight.device
        devices = [] if device.type == "cpu" else [device]
        device_type = "cuda" if device.type == "cpu" else device.type
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            _svd_device_seed(device)
            q = min(k + OVERSAMPLE, min(out_features, in_features))
            u, s, v = torch.svd_lowrank(wt, q=q, niter=POWER_ITERS)
        u, s, v = u[:, :k], s[:k], v[:, :k]
    root = s.clamp_min(0).sqrt()
    p = (u * root).to(weight.dtype).contiguous()
    qf = (root[:, None] * v.t()).to(weight.dtype).contiguous()
    return p, qf


def _finite(p: torch.Tensor, q: torch.Tensor) -> bool:
    return bool(torch.isfinite(p).all()) and bool(torch.isfinite(q).all())


def _build_checked(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """compute_factors, or None when the weight or its factors are not finite."""
    if not bool(torch.isfinite(weight).all()):
        return None
    try:
        p, q = compute_factors(weight, rank)
    except torch.linalg.LinAlgError as exc:  # SVD did not converge
        log.warning("sparselora_fx: SVD of a weight of shape %s failed: %s", tuple(weight.shape), exc)
        return None
    return (p, q) if _finite(p, q) else None


def probe_errors(weight: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> list[float]:
    """`||x P Q - x W^T|| / ||x W^T||` for each of `PROBES` seeded probe rows `x`, in float64.

    The file check on load: the same numbers measured at build time are stored with the factors,
    and a file whose factors were built from another weight (whatever its name and metadata
    claim) gives other numbers against the actual weight. The weight is read once, in float64
    blocks of rows, on its own device; a zero output row gives the absolute error instead.
    """
    out_features, in_features = int(weight.shape[0]), int(weight.shape[1])
    device = torch.device("cpu") if weight.device.type == "mps" else weight.device  # MPS: no float64
    gen = torch.Generator().manual_seed(PROBE_SEED)
    x = torch.randn(PROBES, in_features, generator=gen, dtype=torch.float64).to(device)
    w = weight.detach()
    block = max(1, PROBE_BLOCK_NUMEL // max(1, in_features))
    y = torch.cat([x @ w[s:s + block].to(device=device, dtype=torch.float64).t()
                   for s in range(0, out_features, block)], dim=1)
    approx = (x @ p.detach().to(device=device, dtype=torch.float64)) @ q.detach().to(
        device=device, dtype=torch.float64)
    num = torch.linalg.vector_norm(approx - y, dim=1)
    den = torch.linalg.vector_norm(y, dim=1)
    err = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), num)
    return [float(e) for e in err.cpu()]


def _format_probes(errors: list[float]) -> str:
    return ",".join(repr(float(e)) for e in errors)


def _parse_probes(text: str) -> list[float]:
    values = [float(v) for v in text.split(",")]
    if len(values) != PROBES or not all(v == v and abs(v) != float("inf") for v in values):
        raise ValueError(f"expected {PROBES} finite probe errors, got {text!r}")
    return values


def _file_path(fp: str, k: int) -> Path:
    return cache_dir() / f"{fp}-r{k}.safetensors"


def _metadata(weight: torch.Tensor, fp: str, k: int) -> dict[str, str]:
    return {
        "format": FORMAT_TAG,
        "fingerprint": fp,
        "rank": str(k),
        "shape": "x".join(str(int(s)) for s in weight.shape),
        "dtype": str(weight.dtype),
        "probes": f"{PROBES}@{PROBE_SEED}",
    }


def _reject(path: Path, why: str) -> None:
    _STATE.rejected_files += 1
    counters["sparselora"]["factor_cache_rejected_files"] += 1
    log.warning("sparselora_fx: ignoring factor cache file %s (%s); rebuilding it", path, why)


def _load_from_disk(
    weight: torch.Tensor, fp: str, k: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Read and fully validate one file; None (after logging why) for anything suspicious.

    Name and metadata are only claims: the factors must also reproduce, against this weight, the
    probe errors measured when they were built (`probe_errors`), or the file is rejected.
    """
    path = _file_path(fp, k)
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            claimed = meta.pop("probe_errors", None)
            expected = _metadata(weight, fp, k)
            if meta != expected or claimed is None:
                _reject(path, f"metadata {meta!r} (probe errors {claimed!r}) does not match {expected!r}")
                return None
            stored = _parse_probes(claimed)
            if set(f.keys()) != {"P", "Q"}:
                _reject(path, f"tensors {sorted(f.keys())} are not ['P', 'Q']")
                return None
            p, q = f.get_tensor("P"), f.get_tensor("Q")
    except Exception as exc:  # truncated or corrupt: safetensors raises its own error types
        _reject(path, f"unreadable: {type(exc).__name__}: {exc}")
        return None
    in_features, out_features = int(weight.shape[1]), int(weight.shape[0])
    if (
        tuple(p.shape) != (in_features, k)
        or tuple(q.shape) != (k, out_features)
        or p.dtype != weight.dtype
        or q.dtype != weight.dtype
    ):
        _reject(path, f"tensor shapes/dtypes P{tuple(p.shape)} {p.dtype}, Q{tuple(q.shape)} {q.dtype}")
        return None
    if not _finite(p, q):
        _reject(path, "non-finite values")
        return None
    p, q = p.to(weight.device), q.to(weight.device)
    try:
        measured = probe_errors(weight, p, q)
    except (RuntimeError, ValueError) as exc:  # out of memory, say: not verified, so not used
        _reject(path, f"its probe errors could not be measured: {type(exc).__name__}: {exc}")
        return None
    if any(abs(a - b) > PROBE_TOLERANCE for a, b in zip(measured, stored)):
        _reject(path, f"its factors are not this weight's: probe errors {_format_probes(measured)} "
                      f"against the weight, {claimed} when built")
        return None
    return p, q


def _save_to_disk(weight: torch.Tensor, fp: str, k: int, p: torch.Tensor, q: torch.Tensor) -> None:
    """Write tmp file + os.replace, so readers (other ranks too) never see a partial file."""
    path = _file_path(fp, k)
    tmp_name = None
    try:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        if str(path.parent) not in _SWEPT:  # once per folder and process: a scan, not per write
            _SWEPT.add(str(path.parent))
            sweep_orphans(path.parent)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tensors = {"P": p.detach().cpu().contiguous(), "Q": q.detach().cpu().contiguous()}
        metadata = {**_metadata(weight, fp, k), "probe_errors": _format_probes(probe_errors(weight, p, q))}
        save_file(tensors, tmp_name, metadata=metadata)
        os.replace(tmp_name, path)
        tmp_name = None
        _STATE.disk_writes += 1
        counters["sparselora"]["factor_cache_disk_writes"] += 1
    except Exception as exc:  # a read-only or full disk must not stop training
        level = logging.DEBUG if str(path.parent) in _STATE.write_failed else logging.WARNING
        _STATE.write_failed.add(str(path.parent))
        log.log(
            level,
            "sparselora_fx: could not write factor cache file %s: %s (factors stay in memory; "
            "set SPARSELORA_CACHE_DIR to a writable directory or SPARSELORA_DISK_CACHE=0)",
            path,
            exc,
        )
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


def _warn_unusable(weight: torch.Tensor, fp: str) -> None:
    if fp in _STATE.warned:
        return
    _STATE.warned.add(fp)
    msg = (
        f"sparselora_fx: SVD factors of a frozen weight of shape {tuple(weight.shape)} "
        f"({weight.dtype}) are not finite (the weight holds NaN/Inf or overflows its dtype); "
        "its channels are ranked by token sampling instead (when the weight is known at compile "
        "time, the layer stays dense). Check the checkpoint, or exclude the layer in the policy."
    )
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def get_factors(weight: torch.Tensor, rank: int, *, at_compile_time: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cached rank-`rank` factors (P [in, k], Q [k, out]) of a frozen `weight [out, in]`.

    Returns None, without raising, for meta/fake weights (compile-time tracing: there are no
    values yet) and, with one warning naming the shape, when the factors are not finite; the
    caller then keeps the layer dense or uses another estimator.
    """
    if weight.dim() != 2:
        from .errors import SparseLoRAError

        raise SparseLoRAError(
            f"get_factors: expected a 2-D linear weight [out, in], got shape {tuple(weight.shape)}; "
            "pass the frozen weight of an nn.Linear / F.linear call."
        )
    if weight.numel() == 0 or not has_values(weight, at_compile_time=at_compile_time):
        return None
    if not at_compile_time:  # a step looked the factors up (graphs that hold them never do)
        counters["sparselora"]["factor_lookups"] += 1
    fp = fingerprint(weight)
    k = effective_rank(weight.shape, rank)
    key = (fp, k, str(weight.device))
    with _STATE.lock:
        if key in _STATE.factors:
            _STATE.hits += 1
            counters["sparselora"]["factor_cache_hits"] += 1
            return _STATE.factors[key]
        if key in _STATE.retired:  # unchanged since refresh_factors: take the entry back
            _STATE.hits += 1
            counters["sparselora"]["factor_cache_hits"] += 1
            _STATE.factors[key] = _STATE.retired.pop(key)
            return _STATE.factors[key]
        _STATE.misses += 1
        counters["sparselora"]["factor_cache_misses"] += 1
        start = time.perf_counter()
        use_disk = disk_cache_enabled()
        factors = _load_from_disk(weight, fp, k) if use_disk else None
        if factors is not None:
            _STATE.disk_hits += 1
            counters["sparselora"]["factor_cache_disk_hits"] += 1
        else:
            counters["sparselora"]["factor_cache_builds"] += 1
            factors = _build_checked(weight, rank)
            if factors is not None:
                if use_disk:
                    _save_to_disk(weight, fp, k, *factors)
            else:
                counters["sparselora"]["factor_cache_unusable"] += 1
                _warn_unusable(weight, fp)
        _STATE.build_seconds += time.perf_counter() - start
        _STATE.factors[key] = factors
        return factors


def prepare_factors(
    weights: list[tuple[str, torch.Tensor]], rank: int, progress: bool = True
) -> dict[str, bool]:
    """Build factors for many weights up front (before the first step), with a progress bar.

    Returns name -> whether usable factors exist (False: non-finite or not materialized).
    """
    from tqdm.auto import tqdm

    show = progress and sys.stderr.isatty()
    result: dict[str, bool] = {}
    for name, weight in tqdm(weights, desc="sparselora_fx: SVD factors", disable=not show, unit="w"):
        result[name] = get_factors(weight, rank, at_compile_time=True) is not None
    return result


#: Called by `refresh_factors` with (ids, storage keys, everything) of the tensors it was given;
#: `bound_factors` registers the hook that marks the factors graphs hold for those weights stale.
_REFRESH_HOOKS: list = []


def _plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    """(device, storage address) of a plain tensor with allocated storage, else None."""
    if not _plain(t) or t.device.type == "meta":
        return None
    storage = t.untyped_storage()
    if storage.nbytes() == 0:  # FSDP2's freed unsharded storage: no address to compare
        return None
    return (str(t.device), storage.data_ptr())


def refresh_factors(model: torch.nn.Module | Iterable[torch.Tensor]) -> int:
    """Forget the memoised fingerprints of every parameter of `model`; how many were forgotten.

    Call it after writing new values into frozen weights through `.data` (`p.data.copy_(new)`,
    `p.data = new`): such writes do not bump `p._version`, so without it the fingerprint
    memoised for the old values, and with it the old factors, stay in use. Writes that bump
    `_version` (`load_state_dict`, `p.copy_(new)` under `no_grad`) need no call. The next lookup
    of each weight (the next step) hashes it again: a changed weight gets factors built for its new
    values (or read from a verified cache file), an unchanged one takes its factors back without
    an SVD. No recompile: a compiled graph that holds its weights' factors as inputs
    (`bound_factors`) has them copied in place before its next call; one that looks them up at
    run time (weights without values at compile time) reads them through this cache.

    `model` is a module (its `parameters()` and `buffers()`) or an iterable of tensors; memo
    entries of other tensors sharing their storage (a `.data` alias) go too. Parameters that are
    not plain tensors (FSDP2's DTensor shards: the unsharded weights the steps read are other
    tensors) make it forget every memoised fingerprint, of every model. The factors the forgotten
    fingerprints led to wait in a pool until the next call (so the values written over do not
    keep factors alive for good): refresh every changed model in one call, e.g.
    `refresh_factors(itertools.chain(a.parameters(), b.parameters()))`.
    """
    if isinstance(model, torch.nn.Module):
        tensors = [*model.parameters(), *model.buffers()]
    else:
        tensors = list(model)
    everything = any(not _plain(t) for t in tensors)
    ids = {id(t) for t in tensors}
    storages = {s for s in (_storage_key(t) for t in tensors) if s is not None}
    with _STATE.lock:
        forgotten: list[str] = []
        for key, (ref, geometries) in list(_STATE.memo.items()):
            root = ref()
            if root is None:
                continue
            if everything or key in ids or _storage_key(root) in storages:
                forgotten.extend(fp for _, fp in geometries.values())
                del _STATE.memo[key]
        still_memoised = {fp for _, geometries in _STATE.memo.values() for _, fp in geometries.values()}
        gone = set(forgotten) - still_memoised
        _STATE.retired = {k: v for k, v in _STATE.factors.items() if k[0] in gone}
        for k in _STATE.retired:
            del _STATE.factors[k]
    for hook in _REFRESH_HOOKS:  # factors compiled graphs hold (bound_factors): refilled before their next call
        hook(ids, storages, everything)
    return len(forgotten)


def cache_stats() -> CacheStats:
    """Build time (s), bytes held in memory, entry count, hits and misses of the factor cache.

    Totals since the last ``clear_cache()``; the same events are also counted, process-wide, in
    ``sparselora_fx.counters.counters["sparselora"]["factor_cache_*"]``.
    """
    with _STATE.lock:
        held = 0  # retired entries (see refresh_factors) are held too, until the next refresh
        for value in [*_STATE.factors.values(), *_STATE.retired.values()]:
            if value is not None:
                held += sum(t.numel() * t.element_size() for t in value)
        unusable = sum(1 for v in _STATE.factors.values() if v is None)
        return CacheStats(
            build_seconds=_STATE.build_seconds,
            bytes_in_memory=held,
            entries=len(_STATE.factors),
            hits=_STATE.hits,
            misses=_STATE.misses,
            disk_hits=_STATE.disk_hits,
            disk_writes=_STATE.disk_writes,
            rejected_files=_STATE.rejected_files,
            unusable=unusable,
        )


def clear_cache() -> None:
    """Drop every in-memory entry, memo, warning record and counter (tests, or to free memory)."""
    with _STATE.lock:
        _STATE.factors.clear()
        _STATE.retired.clear()
        _STATE.memo.clear()
        _STATE.warned.clear()
        _STATE.write_failed.clear()
        _STATE.build_seconds = 0.0
        _STATE.hits = _STATE.misses = 0
        _STATE.disk_hits = _STATE.disk_writes = _STATE.rejected_files = 0
