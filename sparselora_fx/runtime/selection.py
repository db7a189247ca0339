"""Which channels of a frozen weight to compute this batch: scores, top-k and channel maps.

Why here and in this form: the graph rewrite inserts one selection op per dataflow group (gated
or plain MLP, attention V/O, attention Q/K). Each op is a `torch.library.custom_op` in namespace
``sparselora`` returning SORTED int64 indices whose count is a static int (never dependent on
the token count), so compiled graphs keep static shapes for the sparse GEMMs and do not recompile
when the sequence length changes. The ops have no autograd: indices are not differentiable.

The maps between index spaces (GQA kv -> q channels, RoPE pairs) are plain functions, reusable by
the rewrite and checked against brute force in the tests. Scores follow the SparseLoRA criteria:
- gated MLP: ||act(g^)_c * u^_c|| over tokens; plain MLP: ||act(h^)_c||;
- V/O: ||V^_c||; O's input channels follow V's through the repeat_kv grouping;
- Q/K: ||K^(j,d)|| * sum_{h in group j} ||Q^(h,d)||, RoPE pairs kept or dropped together.
Padding tokens (mask 0) never contribute (estimators zero their rows; activations map 0 to 0).
"""

from __future__ import annotations

import math
import time
from fractions import Fraction

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import counters as _counters
from ..errors import PolicyError, UnsupportedGraphError
from .estimators import Estimator, _wide, column_l2, get_estimator

__all__ = [
    "ACTIVATIONS",
    "ROPE_LAYOUTS",
    "RopeUnits",
    "activation",
    "keep_count",
    "kv_to_q_channels",
    "mlp_scores",
    "qk_channel_indices",
    "qk_dim_scores",
    "qk_keep_channels",
    "rope_units",
    "select_head_dims",
    "select_mlp",
    "select_qk",
    "select_vo",
    "topk_sorted",
    "vo_scores",
]


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x).square()


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _clock() -> float:
    return time.perf_counter() if _counters._ACTIVE else 0.0


def _record(op: str, out, started: float = 0.0):
    """Hand `out` (the kept indices) to the open ``counters.record_selections`` recorders, if any."""
    if _counters._ACTIVE:
        _counters._note_selection(op, out, started)
    return out


#: Activations by the names the graph analysis reports; each maps 0 to 0 (padding stays zero).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": torch.relu,
    "relu2": _relu2,
    "quick_gelu": _quick_gelu,
}

#: RoPE layouts: no rotation, rotate_half pairs (d, d + rotary_dim/2), interleaved (2i, 2i+1).
ROPE_LAYOUTS = ("none", "half", "interleaved")


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function called `name`; unknown names are a clear error."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedGraphError(
            f"unknown MLP activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}. "
            "The MLP group stays dense unless its activation is one of these."
        ) from None


def keep_count(n_units: int, sparsity: float) -> int:
    """How many units to keep at `sparsity` (fraction dropped): max(1, floor(n * (1 - s))).

    A fixed count (top-k, no threshold), as in SparseLoRA, so shapes stay static.
    """
    if not 0.0 <= float(sparsity) < 1.0:
        raise PolicyError(
            f"sparsity {sparsity!r} is outside [0, 1); it is the fraction of channels dropped "
            "(0 keeps everything, 0.9 keeps 10%). Fix the policy entry."
        )
    if int(n_units) < 1:
        raise PolicyError(f"keep_count: n_units={n_units!r} must be >= 1.")
    # Exact arithmetic on the decimal as written: 100 * (1 - 0.9) keeps 10, as a person computes
    # it (binary floats give 9.999999999999998 -> 9).
    return max(1, math.floor(int(n_units) * (1 - Fraction(str(float(sparsity))))))


def topk_sorted(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` largest scores, sorted ascending, int64."""
    idx = torch.topk(scores, keep, dim=-1).indices
    return torch.sort(idx, dim=-1).values.to(torch.int64)


def _flatten(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    x2d = x.reshape(-1, x.shape[-1])
    if mask is None:
        return x2d, None
    m = mask.reshape(-1)
    if m.shape[0] != x2d.shape[0]:
        raise UnsupportedGraphError(
            f"token mask of shape {tuple(mask.shape)} does not cover the {x2d.shape[0]} tokens of "
            f"x {tuple(x.shape)}; the mask must have x's leading dims."
        )
    return x2d, m


def mlp_scores(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
    mask: torch.Tensor | None,
    act: str,
    estimator: Estimator,
    **factors,
) -> torch.Tensor:
    """Score of each intermediate channel: ||act(g^) * u^|| (gated) or ||act(h^)|| (plain).

    ``factors``: ``factors=[(P, Q), ...]`` for an SVD estimator whose factors the graph holds."""
    fn = activation(act)
    x2d, m = _flatten(x, mask)
    if w2 is None:
        (h,) = estimator.estimate_many(x2d, [(w1, b1)], m, **factors)
        return column_l2(fn(_wide(h)))
    g, u = estimator.estimate_many(x2d, [(w1, b1), (w2, b2)], m, **factors)
    return column_l2(fn(_wide(g)) * _wide(u))


def vo_scores(
    x: torch.Tensor,
    w_v: torch.Tensor,
    b_v: torch.Tensor | None,
    mask: torch.Tensor | None,
    estimator: Estimator,
    **factors,
) -> torch.Tensor:
    """Score of each V output channel: ||V^_c|| over tokens."""
    x2d, m = _flatten(x, mask)
    (norms,) = estimator.column_norms(x2d, [(w_v, b_v)], m, **factors)
    return norms


def kv_to_q_channels(
    idx_kv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> torch.Tensor:
    """Map kv channels (j, d) = j*head_dim + d to q channels h*head_dim + d, h in group j.

    The repeat_kv layout: kv head j serves q heads j*g .. j*g+g-1, g = num_heads // num_kv_heads.
    Used for O's input columns (attention output is num_heads*head_dim wide) and for Q from K.
    Returns sorted int64 of length len(idx_kv) * g.
    """
    g = num_heads // num_kv_heads
    j = torch.div(idx_kv, head_dim, rounding_mode="floor")
    d = idx_kv - j * head_dim
    r = torch.arange(g, device=idx_kv.device, dtype=torch.int64)
    h = j[:, None] * g + r[None, :]
    return torch.sort((h * head_dim + d[:, None]).reshape(-1)).values.to(torch.int64)


@dataclasses.dataclass(frozen=True)
class RopeUnits:
    """Head-dim units for Q/K selection: rotary units (pairs, or single dims without RoPE) and
    pass-through single dims. `rot` is [n_rot_units, width] of head-dim indices."""

    rot: tuple[tuple[int, ...], ...]
    passthrough: tuple[int, ...]

    @property
    def width(self) -> int:
        """Dims per rotary unit (2 for pairs, 1 without RoPE)."""
        return len(self.rot[0]) if self.rot else 1


def _check_rope(head_dim: int, rotary_dim: int, rope: str) -> None:
    if rope not in ROPE_LAYOUTS:
        raise UnsupportedGraphError(
            f"unknown RoPE layout {rope!r}; supported: {', '.join(ROPE_LAYOUTS)} "
            "('half' = rotate_half as in Llama, 'interleaved' = GPT-J style pairs)."
        )
    if not 0 <= rotary_dim <= head_dim:
        raise UnsupportedGraphError(
            f"rotary_dim={rotary_dim} must lie in [0, head_dim={head_dim}]."
        )
    if rope != "none" and rotary_dim % 2:
        raise UnsupportedGraphError(
            f"rotary_dim={rotary_dim} must be even for RoPE layout {rope!r} (dims rotate in pairs)."
        )


@functools.lru_cache(maxsize=64)
def rope_units(head_dim: int, rotary_dim: int, rope: str) -> RopeUnits:
    """The selection units of one head: RoPE pairs among the first `rotary_dim` dims (single
    dims when rope is "none"), single dims for the pass-through rest (partial rotary)."""
    _check_rope(head_dim, rotary_dim, rope)
    half = rotary_dim // 2
    if rope == "half":
        rot = tuple((d, d + half) for d in range(half))
    elif rope == "interleaved":
        rot = tuple((2 * i, 2 * i + 1) for i in range(half))
    else:
        rot = tuple((d,) for d in range(rotary_dim))
    return RopeUnits(rot=rot, passthrough=tuple(range(rotary_dim, head_dim)))


@functools.lru_cache(maxsize=64)
def _rot_index(head_dim: int, rotary_dim: int, rope: str, device: torch.device) -> torch.Tensor:
    """``rope_units(...).rot`` as an int64 tensor on ``device``, made once: a step copies no host
    list to the device (a copy a CUDA-graph capture could not hold)."""
    return torch.tensor(rope_units(head_dim, rotary_dim, rope).rot, dtype=torch.int64, device=device)


def qk_keep_channels(head_dim: int, rotary_dim: int, rope: str, keep_rot: int, keep_pass: int) -> int:
    """Channels kept per head (the same for every head): keep_rot units plus keep_pass dims."""
    units = rope_units(head_dim, rotary_dim, rope)
    n_rot, n_pass = len(units.rot), len(units.passthrough)
    if not 0 <= keep_rot <= n_rot or not 0 <= keep_pass <= n_pass or keep_rot + keep_pass < 1:
        raise UnsupportedGraphError(
            f"select_qk: keep_rot={keep_rot}, keep_pass={keep_pass} do not fit a head with "
            f"{n_rot} rotary unit(s) and {n_pass} pass-through dim(s) (head_dim={head_dim}, "
            f"rotary_dim={rotary_dim}, rope={rope!r}); each must lie in [0, available] and at "
            "least one unit must be kept."
        )
    return keep_rot * units.width + keep_pass


def qk_dim_scores(
    q_norms: torch.Tensor, k_norms: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> torch.Tensor:
    """Score [num_kv_heads, head_dim]: ||K^(j,d)|| * sum over q heads h of group j of ||Q^(h,d)||."""
    g = num_heads // num_kv_heads
    q = q_norms.reshape(num_kv_heads, g, head_dim).sum(dim=1)
    return k_norms.reshape(num_kv_heads, head_dim) * q


def select_head_dims(
    scores: torch.Tensor, keep_rot: int, keep_pass: int, rope: str, rotary_dim: int
) -> torch.Tensor:
    """Per kv head, the kept head dims [num_kv_heads, keep_ch], sorted per row.

    Top keep_rot rotary units (a pair scores the sum of its two dims; pairs kept together) and
    top keep_pass pass-through dims, so every head keeps the same count.
    """
    head_dim = scores.shape[-1]
    units = rope_units(head_dim, rotary_dim, rope)
    qk_keep_channels(head_dim, rotary_dim, rope, keep_rot, keep_pass)
    parts = []
    if keep_rot:
        rot = _rot_index(head_dim, rotary_dim, rope, scores.device)  # [n_rot, w]
        unit_scores = scores[:, rot].sum(dim=-1)  # [kv, n_rot]
        top = torch.topk(unit_scores, keep_rot, dim=-1).indices  # [kv, keep_rot]
        parts.append(rot[top].reshape(scores.shape[0], -1))
    if keep_pass:
        top = torch.topk(scores[:, rotary_dim:], keep_pass, dim=-1).indices
        parts.append(top + rotary_dim)
    return torch.sort(torch.cat(parts, dim=-1), dim=-1).values.to(torch.int64)


def qk_channel_indices(
    dims: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept dims per kv head [kv, keep_ch] -> (idx_q [num_heads*keep_ch], idx_k [kv*keep_ch]),
    channel indices in q's and k's output space; q head h uses the dims of kv head h // g."""
    g = num_heads // num_kv_heads
    kv = torch.arange(num_kv_heads, device=dims.device, dtype=torch.int64)
    idx_k = (kv[:, None] * head_dim + dims).reshape(-1)
    h = torch.arange(num_heads, device=dims.device, dtype=torch.int64)
    idx_q = (h[:, None] * head_dim + dims.repeat_interleave(g, dim=0)).reshape(-1)
    return idx_q, idx_k


# ----------------------------------------------------------------------------------------------
# Validation shared by the real and fake kernels (so mistakes surface at compile time).


def _check_keep(op: str, keep: int, n: int) -> None:
    if not 1 <= keep <= n:
        raise UnsupportedGraphError(
            f"{op}: keep={keep} must lie in [1, {n}] (the number of channels); compute it with "
            "keep_count(n, sparsity)."
        )


def _check_linear(op: str, name: str, w: torch.Tensor, b: torch.Tensor | None, in_f, out_f=None) -> None:
    if w.dim() != 2 or w.shape[1] != in_f or (out_f is not None and w.shape[0] != out_f):
        want = f"[{out_f if out_f is not None else 'out'}, {in_f}]"
        raise UnsupportedGraphError(
            f"{op}: weight {name} has shape {tuple(w.shape)}, expected {want}."
        )
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise UnsupportedGraphError(
            f"{op}: bias of {name} has shape {tuple(b.shape)}, expected ({w.shape[0]},)."
        )


def _check_heads(op: str, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    if num_heads < 1 or num_kv_heads < 1 or head_dim < 1 or num_heads % num_kv_heads:
        raise UnsupportedGraphError(
            f"{op}: num_heads={num_heads}, num_kv_heads={num_kv_heads}, head_dim={head_dim}: "
            "all must be >= 1 and num_heads a multiple of num_kv_heads (GQA groups)."
        )


def _check_mlp(x, w1, b1, w2, b2, keep, act) -> int:
    activation(act)
    _check_linear("select_mlp", "w1", w1, b1, x.shape[-1])
    if w2 is not None:
        _check_linear("select_mlp", "w2", w2, b2, x.shape[-1], w1.shape[0])
    elif b2 is not None:
        raise UnsupportedGraphError("select_mlp: b2 given without w2 (plain MLPs have one input linear).")
    _check_keep("select_mlp", keep, w1.shape[0])
    return keep


def _check_vo(x, w_v, b_v, keep, num_heads, num_kv_heads, head_dim) -> int:
    _check_heads("select_vo", num_heads, num_kv_heads, head_dim)
    _check_linear("select_vo", "w_v", w_v, b_v, x.shape[-1], num_kv_heads * head_dim)
    _check_keep("select_vo", keep, w_v.shape[0])
    return keep * (num_heads // num_kv_heads)


def _check_qk(x_q, w_q, b_q, x_k, w_k, b_k, keep_rot, keep_pass, num_heads, num_kv_heads,
              head_dim, rope, rotary_dim) -> int:
    _check_heads("select_qk", num_heads, num_kv_heads, head_dim)
    _check_linear("select_qk", "w_q", w_q, b_q, x_q.shape[-1], num_heads * head_dim)
    _check_linear("select_qk", "w_k", w_k, b_k, x_k.shape[-1], num_kv_heads * head_dim)
    return qk_keep_channels(head_dim, rotary_dim, rope, keep_rot, keep_pass)


def _estimator(estimator: str, rank: int, samples: int, seed: int, fraction: float = 0.0) -> Estimator:
    return get_estimator(estimator, rank=rank, samples=samples, seed=seed, fraction=fraction)


def _factors(*pq: torch.Tensor | None) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The ``factors`` keyword for the estimator: (P, Q) pairs the graph passed in, one per linear.

    Why: a graph compiled while its weights had values holds their SVD factors as inputs
    (``bound_factors``), so the step never looks them up; without them (every P None) the
    estimator looks them up by the weight's fingerprint, as for weights without values at compile time.
    """
    if any(t is None for t in pq):
        return {}
    return {"factors": [(pq[i], pq[i + 1]) for i in range(0, len(pq), 2)]}  # type: ignore[misc]


def _check_factors(op: str, pq: tuple, linears: tuple) -> None:
    given = [t is not None for t in pq]
    if any(given) and not all(given):
        raise UnsupportedGraphError(f"{op}: pass the factors of every estimated weight, or none.")
    if not any(given):
        return
    for i, w in enumerate(linears):
        p, q = pq[2 * i], pq[2 * i + 1]
        if p.dim() != 2 or q.dim() != 2 or p.shape[0] != w.shape[1] or q.shape[1] != w.shape[0] or p.shape[1] != q.shape[0]:
            raise UnsupportedGraphError(
                f"{op}: factors P {tuple(p.shape)}, Q {tuple(q.shape)} do not fit a weight of shape {tuple(w.shape)} "
                "(expected P [in, k], Q [k, out]).")


# ----------------------------------------------------------------------------------------------
# The custom ops.


@torch.library.custom_op("sparselora::select_mlp", mutates_args=())
def select_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
    mask: torch.Tensor | None,
    keep: int,
    act: str,
    estimator: str = "svd",
    rank: int = 8,
    samples: int = 64,
    seed: int = 0,
    fraction: float = 0.0,
    p1: torch.Tensor | None = None,
    q1: torch.Tensor | None = None,
    p2: torch.Tensor | None = None,
    q2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sorted int64 [keep]: the intermediate channels of a gated (w2 = up) or plain MLP to keep.

    ``p1, q1`` (``p2, q2``): SVD factors of w1 (w2) the graph holds; None: looked up at run time."""
    started = _clock()
    _check_mlp(x, w1, b1, w2, b2, keep, act)
    pq = (p1, q1) if w2 is None else (p1, q1, p2, q2)
    _check_factors("select_mlp", pq, (w1,) if w2 is None else (w1, w2))
    est = _estimator(estimator, rank, samples, seed, fraction)
    with torch.no_grad():
        scores = mlp_scores(x.detach(), w1, b1, w2, b2, mask, act, est, **_factors(*pq))
        return _record("select_mlp", topk_sorted(scores, keep), started)


@select_mlp.register_fake
def _(x, w1, b1, w2, b2, mask, keep, act, estimator="svd", rank=8, samples=64, seed=0, fraction=0.0,
      p1=None, q1=None, p2=None, q2=None):
    _check_mlp(x, w1, b1, w2, b2, keep, act)
    _check_factors("select_mlp", (p1, q1) if w2 is None else (p1, q1, p2, q2), (w1,) if w2 is None else (w1, w2))
    _estimator(estimator, rank, samples, seed, fraction)
    return x.new_empty((keep,), dtype=torch.int64)


@torch.library.custom_op("sparselora::select_vo", mutates_args=())
def select_vo(
    x: torch.Tensor,
    w_v: torch.Tensor,
    b_v: torch.Tensor | None,
    mask: torch.Tensor | None,
    keep: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    estimator: str = "svd",
    rank: int = 8,
    samples: int = 64,
    seed: int = 0,
    fraction: float = 0.0,
    p_v: torch.Tensor | None = None,
    q_v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx_v [keep], idx_o [keep * g]): V output channels and the matching O input channels.

    ``p_v, q_v``: SVD factors of w_v the graph holds; None: looked up at run time."""
    started = _clock()
    _check_vo(x, w_v, b_v, keep, num_heads, num_kv_heads, head_dim)
    _check_factors("select_vo", (p_v, q_v), (w_v,))
    est = _estimator(estimator, rank, samples, seed, fraction)
    with torch.no_grad():
        idx_v = topk_sorted(vo_scores(x.detach(), w_v, b_v, mask, est, **_factors(p_v, q_v)), keep)
        return _record("select_vo", (idx_v, kv_to_q_channels(idx_v, num_heads, num_kv_heads, head_dim)), started)


@select_vo.register_fake
def _(x, w_v, b_v, mask, keep, num_heads, num_kv_heads, head_dim, estimator="svd", rank=8,
      samples=64, seed=0, fraction=0.0, p_v=None, q_v=None):
    n_o = _check_vo(x, w_v, b_v, keep, num_heads, num_kv_heads, head_dim)
    _check_factors("select_vo", (p_v, q_v), (w_v,))
    _estimator(estimator, rank, samples, seed, fraction)
    return x.new_empty((keep,), dtype=torch.int64), x.new_empty((n_o,), dtype=torch.int64)


@torch.library.custom_op("sparselora::select_qk", mutates_args=())
def select_qk(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    b_q: torch.Tensor | None,
    x_k: torch.Tensor,
    w_k: torch.Tensor,
    b_k: torch.Tensor | None,
    mask: torch.Tensor | None,
    keep_rot: int,
    keep_pass: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    rope: str,
    rotary_dim: int,
    estimator: str = "svd",
    rank: int = 8,
    samples: int = 64,
    seed: int = 0,
    fraction: float = 0.0,
    p_q: torch.Tensor | None = None,
    q_q: torch.Tensor | None = None,
    p_k: torch.Tensor | None = None,
    q_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx_q [num_heads*keep_ch], idx_k [num_kv_heads*keep_ch]): the same head dims for K head
    j and every q head of its group, RoPE pairs kept together.

    ``p_q, q_q, p_k, q_k``: SVD factors of w_q and w_k the graph holds; None: looked up at run time."""
    started = _clock()
    _check_qk(x_q, w_q, b_q, x_k, w_k, b_k, keep_rot, keep_pass, num_heads, num_kv_heads,
              head_dim, rope, rotary_dim)
    _check_factors("select_qk", (p_q, q_q, p_k, q_k), (w_q, w_k))
    est = _estimator(estimator, rank, samples, seed, fraction)
    fq, fk = _factors(p_q, q_q), _factors(p_k, q_k)
    with torch.no_grad():
        xq2d, mq = _flatten(x_q.detach(), mask)
        xk2d, mk = _flatten(x_k.detach(), mask)
        if x_q is x_k:
            both = {"factors": fq["factors"] + fk["factors"]} if fq else {}
            q_norm, k_norm = est.column_norms(xq2d, [(w_q, b_q), (w_k, b_k)], mq, **both)
        else:
            (q_norm,) = est.column_norms(xq2d, [(w_q, b_q)], mq, **fq)
            (k_norm,) = est.column_norms(xk2d, [(w_k, b_k)], mk, **fk)
        scores = qk_dim_scores(q_norm, k_norm, num_heads, num_kv_heads, head_dim)
        dims = select_head_dims(scores, keep_rot, keep_pass, rope, rotary_dim)
        return _record("select_qk", qk_channel_indices(dims, num_heads, num_kv_heads, head_dim), started)


@select_qk.register_fake
def _(x_q, w_q, b_q, x_k, w_k, b_k, mask, keep_rot, keep_pass, num_heads, num_kv_heads, head_dim,
      rope, rotary_dim, estimator="svd", rank=8, samples=64, seed=0, fraction=0.0,
      p_q=None, q_q=None, p_k=None, q_k=None):
    keep_ch = _check_qk(x_q, w_q, b_q, x_k, w_k, b_k, keep_rot, keep_pass, num_heads,
                        num_kv_heads, head_dim, rope, rotary_dim)
    _check_factors("select_qk", (p_q, q_q, p_k, q_k), (w_q, w_k))
    _estimator(estimator, rank, samples, seed, fraction)
    return (
        x_q.new_empty((num_heads * keep_ch,), dtype=torch.int64),
        x_q.new_empty((num_kv_heads * keep_ch,), dtype=torch.int64),
    )
