"""Symbolic FLOPs model of a LoRA fine-tuning step, dense and SparseLoRA.

Why: the speedup SparseLoRA can reach is bounded by the GEMM work it removes. This module
counts that work in closed form (sympy), per decoder layer and for the LM head, for the
forward and the backward, so that ``inspect`` tables, benchmarks and docs can state the
ideal speedup of a policy and check measured counts against it.

Conventions (those of ``torch.utils.flop_counter.FlopCounterMode``):

* a matmul ``[M, K] x [K, N]`` costs ``2*M*K*N``; bias adds are free (``addmm`` = ``mm``);
* a frozen linear has no weight gradient: its backward is ``dX`` only (1x its forward), and
  nothing at all when its input needs no gradient (layer 0 of a PEFT model: the embeddings
  are frozen, so autograd skips ``dX`` of q/k/v there); the model follows requires-grad
  through each layer, so partial LoRA target sets are counted as autograd runs them;
* a LoRA factor (A ``[r, in]``, B ``[out, r]``) gets ``dW`` and ``dX`` (2x its forward);
  A's ``dX`` is skipped like a frozen linear's when its input needs no gradient;
* SDPA forward is the two matmuls ``QK^T`` and ``PV`` (``4*B*nh*S^2*D``), its backward the
  five of a FlashAttention backward with the score recompute (``10*B*nh*S^2*D``), which is
  what FlopCounterMode counts. ``causal=False`` (the default) reports these non-causal
  counts, as FlopCounterMode does; ``causal=True`` reports half of them (the unmasked
  triangle). Both are always returned as ``sdpa_noncausal`` and ``sdpa_causal``.

SparseLoRA model: a fraction ``f_out`` of the ``T = B*S`` tokens (the output tokens) runs
dense; the other tokens run the frozen GEMMs on kept channels only:

* MLP: ``keep_count(I, s_mlp)`` intermediate channels (``max(1, floor(I*(1-s)))``, exact
  arithmetic, the plan's rule); gate/up compute only those rows, down reads only those
  columns; the MLP LoRA factors are sliced the same way (gate/up B rows, down A columns);
* attention Q/K: ``D*(1-s_qk)`` head-dim channels per head (continuous: the plan rounds per
  RoPE pair), for all ``nh`` q heads and ``nkv`` k heads; V computes
  ``keep_count(nkv*D, s_vo)`` channels and O reads the matching ``nh/nkv`` times as many
  input channels; q/k/v/o LoRA stays full width and SDPA runs at full head dim;
* estimator, per sparse group and on all ``T`` tokens (no backward): the rank-``k`` SVD
  estimate ``x@P`` then ``@Q`` (``2*T*in*k + 2*T*k*out``) per projection, or the exact
  projection of ``m`` sampled tokens (``2*m*in*out``); two projections for a gated MLP
  (gate, up), one for a plain MLP (fc1), two for QK (q, k), one for VO (v).

Every function accepts ints, floats (kept exact as their decimal value: ``0.9`` is ``9/10``)
or sympy expressions; ``SYMBOLS`` holds the canonical symbols, ``LayerShape.symbolic()`` a fully
symbolic shape, and ``evaluate`` substitutes numbers by symbol name.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Union

import sympy

from .errors import SparseLoRAError

__all__ = [
    "ALL_ROLES",
    "FlopsModelError",
    "LayerShape",
    "PARTS",
    "SYMBOLS",
    "evaluate",
    "flops_dense_lora",
    "keep_count",
    "flops_sparselora",
    "ideal_speedup",
    "unit_dense_flops_per_token",
]

Num = Union[int, float, Fraction, sympy.Expr]


class FlopsModelError(SparseLoRAError, ValueError):
    """A shape, config or value the FLOPs model cannot use."""


def _int_sym(name: str, *, nonnegative: bool = False) -> sympy.Symbol:
    if nonnegative:
        return sympy.Symbol(name, integer=True, nonnegative=True)
    return sympy.Symbol(name, integer=True, positive=True)


def _frac_sym(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, real=True, nonnegative=True)


#: Canonical symbols, by the names ``evaluate`` accepts.
SYMBOLS: dict[str, sympy.Symbol] = {
    "B": _int_sym("B"),  # micro-batch size (sequences)
    "S": _int_sym("S"),  # sequence length
    "H": _int_sym("H"),  # hidden width
    "I": _int_sym("I"),  # MLP intermediate width
    "nh": _int_sym("nh"),  # query heads
    "nkv": _int_sym("nkv"),  # key/value heads
    "D": _int_sym("D"),  # head dim
    "V": _int_sym("V", nonnegative=True),  # vocabulary (0: no LM head)
    "r": _int_sym("r", nonnegative=True),  # LoRA rank
    "k": _int_sym("k"),  # estimator rank
    "m": _int_sym("m"),  # estimator token sample size
    "L": _int_sym("L"),  # number of decoder layers counted
    "s_mlp": _frac_sym("s_mlp"),
    "s_qk": _frac_sym("s_qk"),
    "s_vo": _frac_sym("s_vo"),
    "f_out": _frac_sym("f_out"),
}

_SIZE_NAMES = ("B", "S", "H", "I", "nh", "nkv", "D", "k", "m", "L")
_FRACTION_NAMES = ("s_mlp", "s_qk", "s_vo")

#: Linear roles a LoRA adapter can sit on (a plain MLP uses "up" for fc1, "down" for fc2).
ALL_ROLES: frozenset[str] = frozenset({"q", "k", "v", "o", "gate", "up", "down"})

#: Keys of a breakdown that add up to its "total" (the others are subtotals).
PARTS: tuple[str, ...] = (
    "attn_proj_fwd",
    "attn_proj_bwd",
    "sdpa_fwd",
    "sdpa_bwd",
    "mlp_fwd",
    "mlp_bwd",
    "lora_fwd",
    "lora_bwd",
    "lm_head_fwd",
    "lm_head_bwd",
    "estimator",
)

_ESTIMATORS = ("svd", "sample")
_ATTN_ROLES = frozenset({"q", "k", "v", "o"})


# --------------------------------------------------------------------------- values


def _sym(value: Any, name: str) -> sympy.Expr:
    """One input as an exact sympy value (floats by their decimal text, so 0.9 is 9/10)."""
    if isinstance(value, bool):
        raise FlopsModelError(f"{name}={value!r}: a bool is not a size or fraction; pass a number.")
    if isinstance(value, sympy.Basic):
        return value
    if isinstance(value, numbers.Integral):
        return sympy.Integer(int(value))
    if isinstance(value, Fraction):
        return sympy.Rational(value.numerator, value.denominator)
    if isinstance(value, numbers.Real):
        return sympy.Rational(repr(float(value)))
    raise FlopsModelError(
        f"{name}={value!r} ({type(value).__name__}): expected an int, float, Fraction or sympy "
        "expression."
    )


def _check(name: str, value: sympy.Expr) -> None:
    """Range-check a value once it is a plain number; symbolic values pass."""
    if not value.is_number:
        return
    if name in _SIZE_NAMES and not (value.is_integer and value >= 1):
        raise FlopsModelError(f"{name}={value}: must be a positive integer.")
    if name in ("V", "r") and not (value.is_integer and value >= 0):
        raise FlopsModelError(f"{name}={value}: must be a non-negative integer.")
    if name in _FRACTION_NAMES and not (0 <= value < 1):
        raise FlopsModelError(
            f"{name}={value}: a sparsity is the fraction of channels dropped, in [0, 1); "
            "pass None for a group that stays dense."
        )
    if name == "f_out" and not (0 <= value <= 1):
        raise FlopsModelError(f"f_out={value}: the fraction of dense tokens must lie in [0, 1].")


def _arg(value: Any, name: str) -> sympy.Expr:
    out = _sym(value, name)
    _check(name, out)
    return out


class keep_count(sympy.Function):  # noqa: N801 - reads like a sympy function in formulas
    """Channels kept of ``n`` at sparsity ``s``: the runtime's ``selection.keep_count``.

    Why a sympy function: it stays symbolic until both arguments are numbers, then matches the
    runtime bit for bit. ``s = 0`` keeps everything even for a symbolic ``n``.
    """

    is_integer = True
    is_positive = True

    @classmethod
    def eval(cls, n: sympy.Expr, s: sympy.Expr) -> sympy.Expr | None:
        if s.is_zero:
            return n
        if n.is_number and s.is_number:
            from .runtime.selection import keep_count as runtime_keep_count

            return sympy.Integer(runtime_keep_count(int(n), float(s)))
        return None


# --------------------------------------------------------------------------- shape


@dataclass(frozen=True)
class LayerShape:
    """Widths of one decoder layer and its LM head: everything the FLOPs depend on.

    Why a dataclass of its own: the same counts serve HF configs, hand-built shapes and fully
    symbolic ones. ``gated`` tells a gated MLP (gate/up/down) from a plain one (fc1/fc2,
    counted under the roles "up"/"down"); ``lora_targets`` says which linear roles carry a
    LoRA adapter (the per-kind flags; default every linear). ``V=0`` counts no LM head.
    """

    H: Num
    I: Num  # noqa: E741 - the paper's name for the intermediate width
    nh: Num
    nkv: Num
    D: Num
    V: Num
    r: Num
    gated: bool = True
    lora_targets: frozenset[str] | None = None  # None: every linear of the layer

    def __post_init__(self) -> None:
        for name in ("H", "I", "nh", "nkv", "D", "V", "r"):
            object.__setattr__(self, name, _arg(getattr(self, name), name))
        if self.lora_targets is None:
            targets = _default_targets(self.gated)
        elif isinstance(self.lora_targets, str):
            raise FlopsModelError(
                f"LayerShape.lora_targets={self.lora_targets!r}: pass a set of roles, "
                f"e.g. {{'q', 'v'}}, from {sorted(ALL_ROLES)}."
            )
        else:
            targets = frozenset(self.lora_targets)
        unknown = targets - ALL_ROLES
        if unknown:
            raise FlopsModelError(
                f"LayerShape.lora_targets has unknown roles {sorted(unknown)}; "
                f"use roles from {sorted(ALL_ROLES)}."
            )
        if not self.gated and "gate" in targets:
            raise FlopsModelError(
                "LayerShape(gated=False) has no gate projection, but lora_targets names 'gate'; "
                "a plain MLP's fc1 is the role 'up', fc2 the role 'down'."
            )
        object.__setattr__(self, "lora_targets", targets)
        nh, nkv = self.nh, self.nkv
        if nh.is_number and nkv.is_number and nh % nkv != 0:
            raise FlopsModelError(
                f"LayerShape: nh={nh} query heads is not a multiple of nkv={nkv} key/value heads."
            )

    @classmethod
    def symbolic(cls, gated: bool = True, lora_targets: Iterable[str] | None = None) -> LayerShape:
        """A shape made of the canonical symbols, for closed-form formulas."""
        s = SYMBOLS
        targets = None if lora_targets is None else frozenset(lora_targets)
        return cls(s["H"], s["I"], s["nh"], s["nkv"], s["D"], s["V"], s["r"], gated, targets)

    @classmethod
    def from_hf_config(
        cls, config: Any, lora_rank: int, lora_targets: Iterable[str] | None = None
    ) -> LayerShape:
        """Read the widths from a transformers config (LLaMA/Qwen2/Mistral-like, OPT, BERT).

        Why: users hold a config, not a list of widths. LLaMA-like configs give a gated MLP
        with grouped-query attention; OPT and BERT-like configs a plain MLP (``gated=False``)
        with ``nkv = nh``. ``lora_targets`` defaults to every linear of the layer. BERT's
        pooler/classifier heads are not modelled: ``V`` is its vocabulary (an MLM decoder);
        use ``dataclasses.replace(shape, V=0)`` to drop the head.
        """
        model_type = str(_cfg(config, "model_type", default="")).lower()
        if model_type in _GATED_TYPES:
            gated = True
            inter = _cfg(config, "intermediate_size")
        elif model_type in _OPT_TYPES:
            gated = False
            inter = _cfg(config, "ffn_dim")
            proj = _cfg(config, "word_embed_proj_dim", default=None)
            hidden = _cfg(config, "hidden_size")
            if proj is not None and proj != hidden:
                raise FlopsModelError(
                    f"OPT config has word_embed_proj_dim={proj} != hidden_size={hidden}: its "
                    "project_in/project_out linears are not modelled; build LayerShape by hand "
                    "and add 2*T*proj*hidden per projection."
                )
        elif model_type in _BERT_TYPES:
            gated = False
            inter = _cfg(config, "intermediate_size")
        else:
            raise FlopsModelError(
                f"from_hf_config: model_type {model_type!r} is not known to the FLOPs model "
                f"(known: {sorted(_GATED_TYPES | _OPT_TYPES | _BERT_TYPES)}); build "
                "LayerShape(H, I, nh, nkv, D, V, r, gated=...) directly."
            )
        hidden = int(_cfg(config, "hidden_size"))
        nh = int(_cfg(config, "num_attention_heads"))
        nkv = _cfg(config, "num_key_value_heads", default=None) if gated else None
        nkv = nh if nkv is None else int(nkv)
        head_dim = _cfg(config, "head_dim", default=None)
        if head_dim is None:
            if hidden % nh:
                raise FlopsModelError(
                    f"from_hf_config: hidden_size={hidden} is not divisible by "
                    f"num_attention_heads={nh} and the config has no head_dim; set head_dim."
                )
            head_dim = hidden // nh
        targets = None if lora_targets is None else frozenset(lora_targets)
        return cls(
            H=hidden,
            I=int(inter),
            nh=nh,
            nkv=nkv,
            D=int(head_dim),
            V=int(_cfg(config, "vocab_size")),
            r=lora_rank,
            gated=gated,
            lora_targets=targets,
        )


_GATED_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2"})
_OPT_TYPES = frozenset({"opt"})
_BERT_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "electra"})


def _default_targets(gated: bool) -> frozenset[str]:
    return ALL_ROLES if gated else ALL_ROLES - {"gate"}


def _cfg(config: Any, name: str, **kw: Any) -> Any:
    """A config field from a transformers config object or a plain mapping."""
    if isinstance(config, Mapping):
        value = config.get(name, kw.get("default"))
        present = name in config
    else:
        value = getattr(config, name, kw.get("default"))
        present = hasattr(config, name)
    if not present and "default" not in kw:
        raise FlopsModelError(
            f"from_hf_config: the config has no field {name!r}; pass a LLaMA/Qwen2/Mistral, OPT "
            "or BERT config, or build LayerShape directly."
        )
    return value


# --------------------------------------------------------------------------- GEMM counts


def _frozen(ts: Any, td: Any, din: Any, dout: Any, kin: Any, kout: Any, grad_in: bool):
    """Frozen linear: sparse tokens on kept channels, dense tokens full; backward is dX only."""
    fwd = 2 * (ts * kin * kout + td * din * dout)
    return fwd, (fwd if grad_in else 0)


def _lora(ts: Any, td: Any, din: Any, dout: Any, kin: Any, kout: Any, r: Any, grad_in: bool):
    """LoRA A then B, sliced like the base on sparse tokens; dW always, A's dX if needed."""
    a = 2 * r * (ts * kin + td * din)
    b = 2 * r * (ts * kout + td * dout)
    return a + b, a * (2 if grad_in else 1) + 2 * b


def _estimate(tokens: Any, din: Any, dout: Any, k: Any, estimator: str, samples: Any) -> Any:
    if estimator == "svd":
        return 2 * tokens * din * k + 2 * tokens * k * dout
    return 2 * samples * din * dout


def _layer(
    shape: LayerShape,
    *,
    B: Any,
    S: Any,
    f_out: Any,
    s_mlp: Any,
    s_qk: Any,
    s_vo: Any,
    k: Any,
    estimator: str,
    samples: Any,
    causal: bool,
    grad_in: bool,
) -> tuple[dict[str, Any], bool]:
    """One decoder layer; returns its parts and whether its output needs a gradient."""
    H, I, nh, nkv, D, r = shape.H, shape.I, shape.nh, shape.nkv, shape.D, shape.r
    lora = shape.lora_targets
    T = B * S
    ts, td = T * (1 - f_out), T * f_out
    q_out, kv_out = nh * D, nkv * D
    qk_frac = 1 if s_qk is None else 1 - s_qk
    v_keep = kv_out if s_vo is None else keep_count(kv_out, s_vo)
    o_keep = v_keep * nh / nkv  # every q head of a kv group reads that group's kept channels
    keep = I if s_mlp is None else keep_count(I, s_mlp)

    fwd = {name: sympy.Integer(0) for name in ("attn_proj", "mlp", "lora")}
    bwd = dict(fwd)

    def add(kind: str, pair: tuple[Any, Any]) -> None:
        fwd[kind] += pair[0]
        bwd[kind] += pair[1]

    def linear(role: str, din: Any, dout: Any, kin: Any, kout: Any, g: bool, lora_sliced: bool):
        add("attn_proj" if role in _ATTN_ROLES else "mlp", _frozen(ts, td, din, dout, kin, kout, g))
        if role in lora:
            lk_in, lk_out = (kin, kout) if lora_sliced else (din, dout)
            add("lora", _lora(ts, td, din, dout, lk_in, lk_out, r, g))
        return g or role in lora  # does the output need a gradient?

    # attention projections: q/k keep head-dim channels, v keeps kv channels, o reads them
    g_q = linear("q", H, q_out, H, q_out * qk_frac, grad_in, False)
    g_k = linear("k", H, kv_out, H, kv_out * qk_frac, grad_in, False)
    g_v = linear("v", H, kv_out, H, v_keep, grad_in, False)
    g_attn = g_q or g_k or g_v
    g_o = linear("o", q_out, H, o_keep, H, g_attn, False)
    g_mid = grad_in or g_o

    sdpa_full = 4 * B * nh * S * S * D
    sdpa_scale = sympy.Rational(1, 2) if causal else 1
    sdpa_fwd = sdpa_full * sdpa_scale
    sdpa_bwd = sdpa_fwd * sympy.Rational(5, 2) if g_attn else 0

    # MLP: gate/up compute kept rows, down reads kept columns; LoRA sliced alike
    if shape.gated:
        g_act = linear("gate", H, I, H, keep, g_mid, True)
        g_act = linear("up", H, I, H, keep, g_mid, True) or g_act
    else:
        g_act = linear("up", H, I, H, keep, g_mid, True)
    g_down = linear("down", I, H, keep, H, g_act, True)
    g_out = g_mid or g_down

    est = sympy.Integer(0)
    if s_mlp is not None:
        est += (2 if shape.gated else 1) * _estimate(T, H, I, k, estimator, samples)
    if s_qk is not None:
        est += _estimate(T, H, q_out, k, estimator, samples)
        est += _estimate(T, H, kv_out, k, estimator, samples)
    if s_vo is not None:
        est += _estimate(T, H, kv_out, k, estimator, samples)

    parts = {f"{n}_fwd": fwd[n] for n in fwd} | {f"{n}_bwd": bwd[n] for n in bwd}
    parts |= {
        "sdpa_fwd": sdpa_fwd,
        "sdpa_bwd": sdpa_bwd,
        "estimator": est,
        "sdpa_noncausal": sdpa_full * (sympy.Rational(7, 2) if g_attn else 1),
        "sdpa_causal": sdpa_full * (sympy.Rational(7, 4) if g_attn else sympy.Rational(1, 2)),
    }
    return parts, g_out


def _model(
    shape: LayerShape,
    B: Num,
    S: Num,
    *,
    s_mlp: Any,
    s_qk: Any,
    s_vo: Any,
    f_out: Num,
    k: Num | None,
    estimator: str,
    samples: Num | None,
    causal: bool,
    n_layers: Num,
    input_grad: bool,
) -> dict[str, sympy.Expr]:
    if not isinstance(shape, LayerShape):
        raise FlopsModelError(
            f"expected a LayerShape, got {type(shape).__name__}; build one with "
            "LayerShape.from_hf_config(config, lora_rank) or LayerShape(...)."
        )
    B, S, n_layers, f_out = _arg(B, "B"), _arg(S, "S"), _arg(n_layers, "L"), _arg(f_out, "f_out")
    sparsities = {
        name: None if value is None else _arg(value, name)
        for name, value in (("s_mlp", s_mlp), ("s_qk", s_qk), ("s_vo", s_vo))
    }
    any_sparse = any(v is not None for v in sparsities.values())
    if estimator not in _ESTIMATORS:
        raise FlopsModelError(
            f"estimator={estimator!r}: unknown; use 'svd' (rank-k factors) or 'sample' "
            "(exact projection of `samples` tokens)."
        )
    if any_sparse and estimator == "svd":
        if k is None:
            raise FlopsModelError("estimator='svd' needs the estimator rank k (e.g. k=8).")
        k = _arg(k, "k")
    if any_sparse and estimator == "sample":
        if samples is None:
            raise FlopsModelError(
                "estimator='sample' needs samples=m, the number of tokens it projects exactly."
            )
        samples = _arg(samples, "m")

    common = dict(B=B, S=S, f_out=f_out, k=k, estimator=estimator, samples=samples, causal=causal)
    # Layer 0 may differ (its input may need no gradient); every later layer sees the same
    # requires-grad state as the one after it, so two layer evaluations cover any n_layers.
    first, g_next = _layer(shape, grad_in=input_grad, **sparsities, **common)
    rest, _ = _layer(shape, grad_in=g_next, **sparsities, **common)
    out = {key: sympy.expand(first[key] + (n_layers - 1) * rest[key]) for key in first}

    lm = 2 * B * S * shape.H * shape.V
    out["lm_head_fwd"] = sympy.expand(lm)
    out["lm_head_bwd"] = sympy.expand(lm if g_next else 0)
    for name in ("attn_proj", "sdpa", "mlp", "lora", "lm_head"):
        out[name] = out[f"{name}_fwd"] + out[f"{name}_bwd"]
    out["fwd"] = sum((out[p] for p in PARTS if p.endswith("_fwd")), sympy.Integer(0))
    out["bwd"] = sum((out[p] for p in PARTS if p.endswith("_bwd")), sympy.Integer(0))
    out["total"] = out["fwd"] + out["bwd"] + out["estimator"]
    order = (*PARTS, "attn_proj", "sdpa", "mlp", "lora", "lm_head", "fwd", "bwd", "total")
    return {key: out[key] for key in (*order, "sdpa_noncausal", "sdpa_causal")}


# --------------------------------------------------------------------------- public API


def flops_dense_lora(
    shape: LayerShape,
    B: Num,
    S: Num,
    *,
    causal: bool = False,
    n_layers: Num = 1,
    input_grad: bool = True,
) -> dict[str, sympy.Expr]:
    """FLOPs of one dense-LoRA training step: ``n_layers`` decoder layers plus the LM head.

    Why: the baseline SparseLoRA is measured against. Returns a breakdown of sympy
    expressions: the ``PARTS`` keys (``attn_proj_fwd/_bwd`` and ``mlp_fwd/_bwd`` for the frozen
    GEMMs, ``sdpa_fwd/_bwd``, ``lora_fwd/_bwd``, ``lm_head_fwd/_bwd``, ``estimator`` = 0), their
    sums (``attn_proj``, ``sdpa``, ``mlp``, ``lora``, ``lm_head``, ``fwd``, ``bwd``, ``total``)
    and the informational ``sdpa_causal`` / ``sdpa_noncausal``. ``causal`` picks which SDPA
    count enters the total (default non-causal, as FlopCounterMode counts). ``input_grad``
    says whether the first counted layer's input needs a gradient: False for layer 0 of a
    PEFT model with frozen embeddings, True for any deeper layer.
    """
    return _model(
        shape,
        B,
        S,
        s_mlp=None,
        s_qk=None,
        s_vo=None,
        f_out=0,
        k=None,
        estimator="svd",
        samples=None,
        causal=causal,
        n_layers=n_layers,
        input_grad=input_grad,
    )


def flops_sparselora(
    shape: LayerShape,
    B: Num,
    S: Num,
    s_mlp: Num | None,
    s_qk: Num | None,
    s_vo: Num | None,
    f_out: Num,
    k: Num | None,
    estimator: str = "svd",
    samples: Num | None = None,
    causal: bool = False,
    *,
    n_layers: Num = 1,
    input_grad: bool = True,
) -> dict[str, sympy.Expr]:
    """FLOPs of one SparseLoRA training step, same keys as ``flops_dense_lora``.

    Why: the ideal cost of a policy, to compare with the dense baseline. ``s_*`` is the
    fraction of channels dropped per group (MLP, attention Q/K, attention V/O); ``None``
    keeps a group dense and costs no estimator. ``f_out`` is the fraction of tokens that run
    dense. ``estimator`` is ``"svd"`` (rank ``k``) or ``"sample"`` (``samples`` tokens); its
    cost is counted on all tokens whenever a group is sparse, even at ``s = 0``.
    """
    return _model(
        shape,
        B,
        S,
        s_mlp=s_mlp,
        s_qk=s_qk,
        s_vo=s_vo,
        f_out=f_out,
        k=k,
        estimator=estimator,
        samples=samples,
        causal=causal,
        n_layers=n_layers,
        input_grad=input_grad,
    )


def evaluate(exprs: Mapping[str, Any], **values: Num) -> dict[str, int]:
    """Substitute numbers for symbols (by ``SYMBOLS`` name) and return integer FLOP counts.

    Why: the formulas stay symbolic for docs and algebra; tables and tests need numbers.
    Floats are kept exact as their decimal text (``s_qk=0.9`` is 9/10); keep counts follow
    ``keep_count``. Continuous parts (the Q/K channel fraction) are rounded to the nearest
    integer at the end.
    """
    unknown = sorted(set(values) - set(SYMBOLS))
    if unknown:
        raise FlopsModelError(
            f"evaluate() got unknown names {unknown}; the symbols are {sorted(SYMBOLS)}."
        )
    subs = {SYMBOLS[name]: _arg(v, name) for name, v in values.items()}
    out: dict[str, int] = {}
    for key, expr in exprs.items():
        value = sympy.sympify(expr).subs(subs)
        if value.free_symbols:
            missing = sorted(str(s) for s in value.free_symbols)
            raise FlopsModelError(
                f"evaluate(): {key!r} still depends on {missing}; pass them as keywords, "
                f"e.g. evaluate(exprs, {missing[0]}=...)."
            )
        out[key] = int(sympy.floor(value + sympy.Rational(1, 2)))
    return out


def ideal_speedup(
    shape: LayerShape,
    B: Num,
    S: Num,
    s_mlp: Num | None,
    s_qk: Num | None,
    s_vo: Num | None,
    f_out: Num,
    k: Num | None,
    estimator: str = "svd",
    samples: Num | None = None,
    causal: bool = False,
    *,
    n_layers: Num = 1,
    input_grad: bool = True,
    values: Mapping[str, Num] | None = None,
) -> float:
    """Dense-LoRA total FLOPs over SparseLoRA total FLOPs: the speedup if time were FLOPs.

    Why: the upper bound that measured speedups are judged against. Any symbol still free
    in the shape or arguments is given by ``values`` (names as in ``SYMBOLS``).
    """
    values = dict(values or {})
    dense = flops_dense_lora(shape, B, S, causal=causal, n_layers=n_layers, input_grad=input_grad)
    sparse = flops_sparselora(
        shape,
        B,
        S,
        s_mlp,
        s_qk,
        s_vo,
        f_out,
        k,
        estimator,
        samples,
        causal,
        n_layers=n_layers,
        input_grad=input_grad,
    )
    num = evaluate({"total": dense["total"]}, **values)["total"]
    den = evaluate({"total": sparse["total"]}, **values)["total"]
    if den <= 0:
        raise FlopsModelError("ideal_speedup: the SparseLoRA total is 0 FLOPs; check the shape.")
    return num / den


def unit_dense_flops_per_token(in_features: int, out_features: int) -> int:
    """Forward FLOPs of one dense linear per token (``2*in*out``), for the inspect table.

    Why: a per-unit figure that needs no batch shape, so units of different widths compare.
    """
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise FlopsModelError(
                f"unit_dense_flops_per_token: {name}={value!r} must be a positive int."
            )
    return 2 * int(in_features) * int(out_features)
