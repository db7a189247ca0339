"""Cheap estimates of a frozen linear's output, used only to rank its channels.

Why: SparseLoRA computes a frozen weight on a per-batch subset of channels; which channels is
decided from an *estimate* of `x W^T + b` that costs far less than the real product. Every
estimator here takes `x2d [T, in]`, the weight `[out, in]`, the bias and an optional token mask
`[T]` of 0/1, and returns `[T', out]` whose per-channel L2 norm over rows ranks the channels.

Invariant every caller relies on: rows that do not stand for a real token (padding, or padded
picks of the sampler) are exactly zero, and every activation the selection code applies maps 0
to 0, so those rows never contribute to a score.

Kinds:
- ``svd``: `x P Q + b` with rank-k factors of W^T (k = 8 by default): those the compiled graph
  holds as inputs (built at compile time, `bound_factors`) or, for weights that had no values at
  compile time, from `factor_cache.get_factors`; falls back to ``token_sample`` with one warning
  if the factors are unusable.
- ``token_sample``: the exact `x[s] W^T + b` on `m` tokens sampled among the unmasked ones,
  deterministic for a seed, with no host sync (usable inside torch.compile, dynamic shapes).
  `m = samples`, or with `fraction` set `m = max(samples, floor(fraction * T))`: a sample that
  grows with the micro-batch keeps the estimator a fixed share of the layer's GEMM work.
- ``random``: uniform random scores, a fresh draw per call (deterministic for a seed and call
  order). A baseline for accuracy studies (what selection without information costs), never a
  choice for training.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import logging
import warnings
from collections.abc import Sequence
from fractions import Fraction
from typing import ClassVar

import torch

from .. import estimator_registry
from ..errors import OptionsError
from .. import factor_cache
from ..policy import describe_estimator  # the policy owns the text of an estimator spec

__all__ = [
    "Estimator",
    "describe_estimator",
    "SvdEstimator",
    "RandomEstimator",
    "TokenSampleEstimator",
    "estimator_kinds",
    "get_estimator",
    "register_estimator",
    "reset_random_estimators",
    "sample_tokens",
]

log = logging.getLogger("sparselora_fx")

_M31 = (1 << 31) - 1

Linear = tuple[torch.Tensor, "torch.Tensor | None"]


def _check_inputs(x2d: torch.Tensor, mask: torch.Tensor | None) -> None:
    if x2d.dim() != 2:
        raise OptionsError(
            f"estimator: expected x2d of shape [tokens, in], got {tuple(x2d.shape)}; "
            "flatten the leading dims first (x.reshape(-1, x.shape[-1]))."
        )
    if mask is not None and (mask.dim() != 1 or mask.shape[0] != x2d.shape[0]):
        raise OptionsError(
            f"estimator: token mask of shape {tuple(mask.shape)} does not match x2d "
            f"{tuple(x2d.shape)}; pass one 0/1 entry per token, flattened like x."
        )


def _wide(y: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 estimates are reduced in float32)."""
    return y if y.dtype in (torch.float32, torch.float64) else y.float()


def column_l2(y: torch.Tensor) -> torch.Tensor:
    """Per-column L2 norm over rows, at least in float32.

    Why not `linalg.vector_norm(dim=0)`: on CPU its strided reduction took 0.9 ms on a
    [64, 2816] block where the sum of squares takes 0.05 ms, and the selection ops run it on every
    layer every step (no overflow rescaling is needed: float32 squares of activations below 1e19).
    """
    w = _wide(y)
    return (w * w).sum(dim=0).sqrt()


def _row_weight(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """0/1 per row in the compute dtype (None: every row is real)."""
    if mask is None:
        return None
    return (mask != 0).to(dtype)


class Estimator(abc.ABC):
    """One way to estimate `x W^T + b` for channel ranking; subclasses register a `kind`."""

    kind: ClassVar[str]

    @abc.abstractmethod
    def estimate(
        self,
        x2d: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Estimate `[T', out]`; rows that are not real tokens are exactly zero."""

    def column_norms(
        self, x2d: torch.Tensor, linears: Sequence[Linear], mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Per output channel, the L2 norm over tokens of each linear's estimate (float32 or wider).

        What V/O and Q/K scores need; estimators may compute it without materialising `[T, out]`.
        """
        return [column_l2(y) for y in self.estimate_many(x2d, linears, mask)]

    def estimate_many(
        self, x2d: torch.Tensor, linears: Sequence[Linear], mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Estimates of several linears of the same input, row-aligned (same tokens per row).

        Row alignment matters for gated MLPs, whose score multiplies gate and up estimates
        elementwise.
        """
        return [self.estimate(x2d, w, b, mask) for w, b in linears]


def sample_tokens(
    num_tokens: int | torch.SymInt,
    samples: int,
    seed: int,
    mask: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick min(samples, T) token rows, unmasked ones first, deterministically for `seed`.

    Why this shape: no host sync and no data-dependent shapes (no .item(), nonzero or boolean
    indexing), so it traces under torch.compile with a symbolic T. Each token gets a
    pseudo-random integer key from a hash of (position, seed), unique per position; masked tokens
    get key -1, so top-m picks real tokens first; when fewer than m real tokens exist, the padded
    picks come back with validity 0. Returns (picks int64 [m'], validity bool [m'] or None).
    """
    m = torch.sym_min(samples if isinstance(samples, torch.SymInt) else int(samples), num_tokens)
    pos = torch.arange(num_tokens, device=device, dtype=torch.int64)
    # Host-side mixing of the seed into a 31-bit offset (seed is a static Python int).
    s = (int(seed) * 0x9E3779B1 + 0x7F4A7C15) & _M31
    s ^= s >> 13
    # Integer hash kept below 2**31 before each multiply, so int64 never overflows.
    h = (pos + s) & _M31
    for mult in (0x2C1B3C6D, 0x297A2D39, 0x1B873593):
        h = h ^ (h >> 15)
        h = (h * mult) & _M31
    h = h ^ (h >> 16)
    keys = h * (1 << 31) + pos  # unique: ties never depend on topk's tie-breaking
    valid_tok = None
    if mask is not None:
        valid_tok = mask != 0
        keys = torch.where(valid_tok, keys, torch.full_like(keys, -1))
    picks = torch.topk(keys, m).indices
    if valid_tok is None:
        return picks, None
    return picks, valid_tok.index_select(0, picks)


@dataclasses.dataclass(frozen=True)
class TokenSampleEstimator(Estimator):
    """Exact output on m sampled tokens among the unmasked ones (m >= T -> exact).

    m = `samples`, or with `fraction` > 0, max(`samples`, floor(`fraction` * T)) for T rows.
    """

    kind: ClassVar[str] = "token_sample"
    samples: int = 64
    seed: int = 0
    fraction: float = 0.0
    # The fraction as an exact ratio of ints (0.03 -> 3/100, as written): traced code never
    # branches on a float attribute (Dynamo would make it a symbolic float and restart the frame)
    # and floor(0.03 * 1000) is 30, not 29.
    _ratio: tuple[int, int] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        exact = Fraction(str(float(self.fraction)))
        object.__setattr__(self, "_ratio", (exact.numerator, exact.denominator))

    def sample_count(self, num_tokens: int | torch.SymInt) -> int | torch.SymInt:
        """How many tokens to sample from `num_tokens` rows (before clamping to the rows)."""
        num, den = self._ratio
        if num == 0:
            return self.samples
        return torch.sym_max(self.samples, (num_tokens * num) // den)

    def estimate(self, x2d, weight, bias, mask=None):
        return self.estimate_many(x2d, [(weight, bias)], mask)[0]

    def estimate_many(self, x2d, linears, mask=None):
        _check_inputs(x2d, mask)
        m = self.sample_count(x2d.shape[0])
        picks, valid = sample_tokens(x2d.shape[0], m, self.seed, mask, x2d.device)
        xs_t = x2d.index_select(0, picks).t()
        outs = []
        for weight, bias in linears:
            # (W xs^T)^T, not xs W^T: with few sampled rows the weight-major product ran 1.5x
            # faster on CPU (2.7 vs 4.7 ms for 64 x 1024 x 2816), and the column norms that
            # follow then reduce along contiguous memory.
            w = weight.to(xs_t.dtype)
            y = (w @ xs_t if bias is None else torch.addmm(bias.to(xs_t.dtype)[:, None], w, xs_t)).t()
            if valid is not None:
                y = y * valid.to(y.dtype)[:, None]
            outs.append(y)
        return outs


_FALLBACK_WARNED: set[tuple[tuple[int, ...], str]] = set()


@dataclasses.dataclass(frozen=True)
class SvdEstimator(Estimator):
    """`x P Q + b` with cached rank-`rank` SVD factors of W^T (full rank -> exact).

    `samples` and `seed` configure the token-sample fallback used when a weight's factors are
    not finite: that layer is then ranked by sampling, never silently wrong. Runs eagerly (inside
    the selection ops): while tracing, weights have no values and it samples tokens instead.
    """

    kind: ClassVar[str] = "svd"
    rank: int = 8
    samples: int = 64
    seed: int = 0

    def _fallback(self, weight: torch.Tensor) -> TokenSampleEstimator:
        key = (tuple(int(s) for s in weight.shape), str(weight.dtype))
        if key not in _FALLBACK_WARNED and factor_cache.has_values(weight):
            _FALLBACK_WARNED.add(key)
            msg = (
                f"sparselora_fx: no usable SVD factors for a weight of shape {key[0]} "
                f"({key[1]}); ranking its channels by token sampling (samples={self.samples}) "
                "instead. Check the weight for NaN/Inf."
            )
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=4)
        return TokenSampleEstimator(samples=self.samples, seed=self.seed)

    def estimate(self, x2d, weight, bias, mask=None, factors=None):
        """``factors`` = (P, Q) held by the compiled graph (``bound_factors``); None: look them up."""
        _check_inputs(x2d, mask)
        if factors is None:
            factors = factor_cache.get_factors(weight, self.rank)
        if factors is None:
            return self._fallback(weight).estimate(x2d, weight, bias, mask)
        p, q = factors
        y = (x2d @ p.to(x2d.dtype)) @ q.to(x2d.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        row = _row_weight(mask, y.dtype)
        if row is not None:
            y = y * row[:, None]
        return y

    def column_norms(self, x2d, linears, mask=None, factors=None):
        # ||x P Q_c + b_c||^2 over tokens = [Q; b]_c^T G [Q; b]_c with G = Z^T Z, Z = [x P, 1]
        # (masked rows zeroed): a [k+1, k+1] Gram matrix instead of the [T, out] estimate. The
        # projections x P of all linears come from one GEMM: x is read once (memory-bound on CPU).
        if factors is None:
            factors = [factor_cache.get_factors(w, self.rank) for w, _ in linears]
        if any(f is None for f in factors):
            return self._fallback(linears[0][0]).column_norms(x2d, linears, mask)
        xw = _wide(x2d)
        z_all = xw @ torch.cat([p.to(xw.dtype) for p, _ in factors], dim=1)
        row = _row_weight(mask, z_all.dtype)
        if row is not None:
            z_all = z_all * row[:, None]
        ones = torch.ones(z_all.shape[0], 1, dtype=z_all.dtype, device=z_all.device) if row is None else row[:, None]
        out, start = [], 0
        for (p, q), (_, bias) in zip(factors, linears):
            z, start = z_all[:, start:start + p.shape[1]], start + p.shape[1]
            q = q.to(z.dtype)
            if bias is not None:
                z = torch.cat([z, ones], dim=1)
                q = torch.cat([q, bias.to(z.dtype)[None, :]], dim=0)
            gram = z.T @ z
            out.append(((gram @ q) * q).sum(dim=0).clamp_min(0).sqrt())
        return out

    def estimate_many(self, x2d, linears, mask=None, factors=None):
        # Rows must stay aligned across the linears (a gated MLP multiplies gate and up
        # estimates): if any weight lacks usable factors, every one of them is token-sampled.
        if factors is None:
            factors = [factor_cache.get_factors(w, self.rank) for w, _ in linears]
        if any(f is None for f in factors):
            return self._fallback(linears[0][0]).estimate_many(x2d, linears, mask)
        return [self.estimate(x2d, w, b, mask, f) for (w, b), f in zip(linears, factors)]


@dataclasses.dataclass(frozen=True)
class RandomEstimator(Estimator):
    """Uniform random scores in [0, 1): channel choice without information (a study baseline).

    One row per linear, drawn from a CPU generator seeded once per `seed` and advanced by every
    call, so each micro-batch gets a fresh selection and a rerun repeats the sequence.
    """

    kind: ClassVar[str] = "random"
    seed: int = 0

    def estimate(self, x2d, weight, bias, mask=None):
        return self.estimate_many(x2d, [(weight, bias)], mask)[0]

    def estimate_many(self, x2d, linears, mask=None):
        _check_inputs(x2d, mask)
        gen = _random_generator(self.seed)
        dtype = _wide(x2d).dtype
        return [torch.rand(1, w.shape[0], generator=gen, dtype=dtype).to(x2d.device) for w, _ in linears]

    def column_norms(self, x2d, linears, mask=None):
        return [y[0] for y in self.estimate_many(x2d, linears, mask)]


@functools.lru_cache(maxsize=None)
def _random_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def reset_random_estimators() -> None:
    """Restart every random estimator's sequence (tests and studies that rerun a training)."""
    _random_generator.cache_clear()


def register_estimator(cls: type[Estimator]) -> type[Estimator]:
    """Add an estimator class (a frozen dataclass with a `kind`) to the registry.

    The registry is `sparselora_fx.estimator_registry`, which the policy reads too: once
    registered, the kind can be named in a policy's `estimator` entry, with those of rank,
    samples, seed, fraction the class takes as fields (a built-in kind keeps its knobs).
    """
    if not (isinstance(cls, type) and issubclass(cls, Estimator)):
        raise OptionsError(f"register_estimator: {cls!r} is not an Estimator subclass.")
    estimator_registry.register(cls.kind, cls)
    return cls


register_estimator(SvdEstimator)
register_estimator(TokenSampleEstimator)
register_estimator(RandomEstimator)


def _registered() -> dict[str, type[Estimator]]:
    """Kind -> class, for every kind bound to a class (all built-ins once this module is imported)."""
    entries = (estimator_registry.lookup(k) for k in estimator_registry.kinds())
    return {e.name: e.factory for e in entries if e is not None and e.factory is not None}


def estimator_kinds() -> tuple[str, ...]:
    """The registered estimator kinds, sorted."""
    return tuple(sorted(_registered()))


def _param_names() -> set[str]:
    names: set[str] = set()
    for cls in _registered().values():
        names.update(f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_"))
    return names


@functools.lru_cache(maxsize=256)
def _build(cls: type[Estimator], items: tuple[tuple[str, object], ...]) -> Estimator:
    # Keyed on the class, not the kind: a kind registered again builds its new class.
    own = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in items if k in own})


def get_estimator(kind: str, **params: int | float) -> Estimator:
    """The estimator of `kind` configured by `params` (rank, samples, seed, fraction).

    Parameters known to some kind but not this one are ignored (the selection ops pass the same
    knobs to every kind); names no kind knows, non-integers or values < 1 (rank, samples), a
    fraction outside [0, 1] are errors, as is an unknown kind.
    """
    entry = estimator_registry.lookup(kind)
    if entry is None or entry.factory is None:
        raise OptionsError(
            f"unknown estimator {kind!r}; known estimators: {', '.join(estimator_kinds())}. "
            "Set the estimator option / policy entry to one of these."
        )
    unknown = set(params) - _param_names()
    if unknown:
        raise OptionsError(
            f"estimator {kind!r}: unknown parameter(s) {sorted(unknown)}; "
            f"accepted: {sorted(_param_names())}."
        )
    for name, value in params.items():
        if name == "fraction":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise OptionsError(
                    f"estimator {kind!r}: fraction={value!r} must be a number in [0, 1] "
                    "(the share of a micro-batch's tokens to sample; 0 = use `samples` alone)."
                )
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionsError(
                f"estimator {kind!r}: parameter {name}={value!r} must be an int."
            )
        if name in ("rank", "samples") and value < 1:
            raise OptionsError(
                f"estimator {kind!r}: parameter {name}={value} must be >= 1."
            )
    if "fraction" in params:
        params = {**params, "fraction": float(params["fraction"])}
    return _build(entry.factory, tuple(sorted(params.items())))
