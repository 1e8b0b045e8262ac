"""Training recipes: which operand of which GEMM of a linear layer is quantized, and how.

A linear layer ``y = x W^T`` (x: (M, K) tokens by features, W: (N, K)) runs three GEMMs per step, each
written ``A @ B^T`` with both operands laid out (rows, reduction) and quantized along the reduction dim:

    GEMM    computes            A (rows, red.)        B (rows, red.)         reduction
    fprop   y  = x W^T          x      (M, K)         W      (N, K)          K  (in_features)
    dgrad   dx = dy W           dy     (M, N)         W^T    (K, N)          N  (out_features)
    wgrad   dW = dy^T x         dy^T   (N, M)         x^T    (K, M)          M  (tokens)

A ``Recipe`` holds one ``GemmQuant(a, b)`` per GEMM and one ``OperandQuant(scheme, rounding, rht)`` per
operand, so every decision of a recipe is one field and every ablation is one ``dataclasses.replace``.

Named recipes (``get_recipe(name)``; ``RECIPES`` lists them):

    bf16            nothing quantized: the layer is ``F.linear`` (the baseline)
    fp8             per-tensor FP8: E4M3 for x and W, E5M2 for dy (the "hybrid" FP8 recipe)
    fp8-blockwise   DeepSeek-V3 (arXiv 2412.19437): E4M3 everywhere, 1x128 tiles for x and dy along each
                    GEMM's reduction dim, 128x128 blocks for W
    mxfp4           OCP MXFP4 (E2M1, 1x32 blocks, E8M0 scales) on all three GEMMs, RNE, no extras
    nvfp4           NVFP4 pre-training (arXiv 2509.25149): W in 16x16 blocks (fprop and dgrad see the same
                    quantized W), x and dy in 1x16 blocks; stochastic rounding on dy (dgrad and wgrad);
                    16-point random Hadamard transform on both wgrad inputs along the token dim, one fixed
                    sign vector for the run; the linears of the first block and of the last 15% of blocks
                    (at least one) kept in high precision
    nvfp4-no-sr / nvfp4-no-rht / nvfp4-no-2d        one ingredient off (RNE dy / no RHT / 1x16 W blocks)
    nvfp4-none      all three off
    nvfp4+4over6    four-over-six block scales (arXiv 2512.02010) on every operand
    nvfp4+late-bf16 the paper's late switch: the forward GEMM runs in high precision for the last 10% of
                    training (``switch_to_bf16_at=0.9``, ``switch_scope=FPROP``; the paper switches at
                    82% of its 10T-token run and finds fprop alone recovers most of the loss gap)
    fp8-blockwise+acc14             Hopper-like 14-bit tensor-core accumulation, never promoted
    fp8-blockwise+acc14-promote128  ... promoted to FP32 every 128 elements of K (DeepSeek-V3's fix)

Embeddings, the LM head, attention BMMs and norms are never quantized (they are not ``nn.Linear`` layers
of a block, or ``fourbit.nn.convert`` keeps them). ``HighPrecision`` chooses which blocks' linears stay in
high precision too.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from .formats import E2M1, E4M3, E5M2, FloatFormat, get_format
from .hadamard import DEFAULT_RHT_SEED
from .rounding import Rounding
from .schemes import ErrorMetric, FP8Config, MXConfig, NVFP4Config, ScaleMode, SchemeConfig

if TYPE_CHECKING:
    from .accumulation import Accumulation

__all__ = [
    "OperandQuant",
    "GemmQuant",
    "HighPrecision",
    "SwitchScope",
    "Recipe",
    "RECIPES",
    "bf16",
    "fp8",
    "fp8_blockwise",
    "mxfp4",
    "nvfp4",
    "get_recipe",
]

DEFAULT_SEED = 0
LATE_BF16_AT = 0.9  # nvfp4+late-bf16: high-precision fprop for the last 10% of training


# --- one operand, one GEMM -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OperandQuant:
    """How one GEMM operand is quantized along its reduction dim.

    scheme    a scheme config (NVFP4Config, MXConfig, FP8Config), or None to keep the operand in high precision
    rounding  round-to-nearest-even or stochastic (seeded per layer, step and role, see ``fourbit.nn``)
    rht       apply the 16-point random Hadamard transform along the reduction dim first (wgrad only:
              both operands must get it, or the product changes)
    """

    scheme: SchemeConfig | None = None
    rounding: Rounding = Rounding.NEAREST
    rht: bool = False

    def __post_init__(self) -> None:
        if self.scheme is not None and not isinstance(self.scheme, (NVFP4Config, MXConfig, FP8Config)):
            raise TypeError(f"OperandQuant: scheme must be a scheme config or None, got {type(self.scheme).__name__}")
        if not isinstance(self.rounding, Rounding):
            raise TypeError(f"OperandQuant: rounding must be a Rounding, got {self.rounding!r}")
        if self.scheme is None and (self.rounding is not Rounding.NEAREST or self.rht):
            raise ValueError("OperandQuant: rounding/rht need a scheme (an unquantized operand is not rounded)")

    @property
    def quantized(self) -> bool:
        return self.scheme is not None

    def __str__(self) -> str:
        if self.scheme is None:
            return "hp"
        s = _scheme_str(self.scheme)
        if self.rounding is Rounding.STOCHASTIC:
            s += "+sr"
        return s + ("+rht" if self.rht else "")


HP = OperandQuant()  # high precision: not quantized


@dataclass(frozen=True)
class GemmQuant:
    """The two operands of ``A @ B^T`` (see the table in the module docstring for what A and B are)."""

    a: OperandQuant = HP
    b: OperandQuant = HP

    def __post_init__(self) -> None:
        for name in ("a", "b"):
            if not isinstance(getattr(self, name), OperandQuant):
                raise TypeError(f"GemmQuant.{name} must be an OperandQuant, got {getattr(self, name)!r}")
        if self.a.rht != self.b.rht:
            raise ValueError("GemmQuant: the RHT must be applied to both operands or neither (else A B^T changes)")

    @property
    def quantized(self) -> bool:
        return self.a.quantized or self.b.quantized

    def __str__(self) -> str:
        return f"{self.a} x {self.b}"


HP_GEMM = GemmQuant()


# --- which layers stay in high precision -----------------------------------------------------------------


@dataclass(frozen=True)
class HighPrecision:
    """Which repeated blocks keep their linear layers in high precision (BF16 under autocast).

    The first ``first_blocks`` blocks and the last ``max(min_last_blocks, round(last_fraction * n))`` of
    ``n`` blocks. The NVFP4 paper keeps about 16% of linears in BF16, mostly the final ones (12B: the first
    2 and last 8 of 62 blocks, 10/62). The default keeps the last ``round(0.15 n)`` (at least one) and no
    first block, so the kept share stays near the paper's at every depth: 62 blocks -> 9 (14.5%), 12 -> 2
    (16.7%), 6 -> 1 (16.7%); a 4-block model cannot go below 1/4. (Keeping the first block as well, as
    this default did before, holds 2 of 4 blocks = 50%, or 3 of 12 = 25%, far above the paper's share.)
    ``HighPrecision(first_blocks=2, last_fraction=8 / 62)`` is the paper's 12B choice exactly.
    ``fraction(n)`` is the kept share; all blocks of a model have the same Linears, so it is both the
    share of Linears and of their parameters. Embeddings and the LM head are never quantized regardless.
    """

    first_blocks: int = 0
    last_fraction: float = 0.15
    min_last_blocks: int = 1

    def __post_init__(self) -> None:
        for name in ("first_blocks", "min_last_blocks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"HighPrecision: {name} must be a non-negative int, got {v!r}")
        if not (isinstance(self.last_fraction, (int, float)) and 0.0 <= self.last_fraction <= 1.0):
            raise ValueError(f"HighPrecision: last_fraction must be in [0, 1], got {self.last_fraction!r}")

    @classmethod
    def none(cls) -> "HighPrecision":
        """Quantize every block."""
        return cls(first_blocks=0, last_fraction=0.0, min_last_blocks=0)

    def blocks(self, n: int) -> frozenset[int]:
        """Indices of the high-precision blocks among ``n``."""
        last = max(self.min_last_blocks, round(self.last_fraction * n))
        first = set(range(min(self.first_blocks, n)))
        return frozenset(first | set(range(max(0, n - last), n)))

    def fraction(self, n: int) -> float:
        """Share of ``n`` blocks (so of their Linears) kept in high precision."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"HighPrecision.fraction: n must be a positive int, got {n!r}")
        return len(self.blocks(n)) / n

    def __str__(self) -> str:
        if self == HighPrecision.none():
            return "none"
        return f"first {self.first_blocks}, last {self.last_fraction:.0%} (>= {self.min_last_blocks}) of blocks"


class SwitchScope(enum.Enum):
    """What the late switch to high precision covers."""

    FPROP = "fprop"  # the forward GEMM only (the paper: recovers most of the gap)
    ALL = "all"  # all three GEMMs


# --- the recipe -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A named training recipe: one ``GemmQuant`` per GEMM, plus the run-level options.

    high_precision     which blocks' linears stay unquantized (used by ``fourbit.nn.convert``)
    switch_to_bf16_at  training-progress fraction in [0, 1] from which ``switch_scope`` runs in high
                       precision (needs ``fourbit.nn.set_progress`` each step); None never switches
    rht_seed           seed of the RHT's fixed sign vector, shared by all layers for the whole run
    seed               root seed of stochastic rounding: a layer's seed at a step is a fixed mix of
                       (seed, layer id, step, role)
    accumulation       a ``fourbit.accumulation.Accumulation`` model for every quantized GEMM, or None
                       for exact float32 accumulation
    """

    name: str
    fprop: GemmQuant = HP_GEMM
    dgrad: GemmQuant = HP_GEMM
    wgrad: GemmQuant = HP_GEMM
    high_precision: HighPrecision = HighPrecision.none()
    switch_to_bf16_at: float | None = None
    switch_scope: SwitchScope = SwitchScope.FPROP
    rht_seed: int = DEFAULT_RHT_SEED
    seed: int = DEFAULT_SEED
    accumulation: "Accumulation | None" = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Recipe: name must be a non-empty string, got {self.name!r}")
        for gemm in ("fprop", "dgrad", "wgrad"):
            if not isinstance(getattr(self, gemm), GemmQuant):
                raise TypeError(f"Recipe.{gemm} must be a GemmQuant, got {getattr(self, gemm)!r}")
        if self.fprop.a.rht or self.dgrad.a.rht:
            raise ValueError("Recipe: the RHT is supported on wgrad only (fprop/dgrad would need it on W too)")
        if not isinstance(self.high_precision, HighPrecision):
            raise TypeError(f"Recipe.high_precision must be a HighPrecision, got {self.high_precision!r}")
        s = self.switch_to_bf16_at
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0):
            raise ValueError(f"Recipe: switch_to_bf16_at must be None or a fraction in [0, 1], got {s!r}")
        if not isinstance(self.switch_scope, SwitchScope):
            raise TypeError(f"Recipe.switch_scope must be a SwitchScope, got {self.switch_scope!r}")
        for name in ("rht_seed", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"Recipe: {name} must be a non-negative int, got {v!r}")
        if self.accumulation is not None and not callable(getattr(self.accumulation, "matmul", None)):
            raise TypeError(f"Recipe.accumulation must be an Accumulation or None, got {self.accumulation!r}")

    # -- derived -------------------------------------------------------------------------------------
    @property
    def gemms(self) -> dict[str, GemmQuant]:
        return {"fprop": self.fprop, "dgrad": self.dgrad, "wgrad": self.wgrad}

    @property
    def quantized(self) -> bool:
        """Whether any GEMM quantizes anything (False for bf16: the layer is plain ``F.linear``)."""
        return any(g.quantized for g in self.gemms.values())

    @property
    def stochastic(self) -> bool:
        """Whether any operand is stochastically rounded (its layers then need SR seeds each step)."""
        return any(op.rounding is Rounding.STOCHASTIC for g in self.gemms.values() for op in (g.a, g.b))

    def feature_multiple(self) -> int:
        """in_features and out_features must be multiples of this (every block dim of every operand).

        The token dim M is zero-padded inside the layer instead (exact: zero rows add nothing to a GEMM).
        """
        dims = [1]
        for gemm in self.gemms.values():
            for op in (gemm.a, gemm.b):
                if op.scheme is not None and op.scheme.block is not None:
                    dims.extend(op.scheme.block)
        return math.lcm(*dims)

    def at(self, progress: float | None) -> "Recipe":
        """The recipe in effect at a training-progress fraction (applies the late switch to high precision)."""
        if self.switch_to_bf16_at is None or progress is None or progress < self.switch_to_bf16_at:
            return self
        if self.switch_scope is SwitchScope.FPROP:
            return replace(self, fprop=HP_GEMM, switch_to_bf16_at=None)
        return replace(self, fprop=HP_GEMM, dgrad=HP_GEMM, wgrad=HP_GEMM, switch_to_bf16_at=None)

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (for logs and checkpoints); ``Recipe.from_dict`` inverts it."""
        return {
            "name": self.name,
            **{g: {"a": _operand_to_dict(q.a), "b": _operand_to_dict(q.b)} for g, q in self.gemms.items()},
            "high_precision": {f.name: getattr(self.high_precision, f.name) for f in fields(HighPrecision)},
            "switch_to_bf16_at": self.switch_to_bf16_at,
            "switch_scope": self.switch_scope.value,
            "rht_seed": self.rht_seed,
            "seed": self.seed,
            "accumulation": None
            if self.accumulation is None
            else {f.name: getattr(self.accumulation, f.name) for f in fields(self.accumulation)},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        if not isinstance(d, dict):
            raise TypeError(f"Recipe.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Recipe.from_dict: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        kw: dict[str, Any] = {"name": d["name"]}
        for g in ("fprop", "dgrad", "wgrad"):
            if g in d:
                kw[g] = GemmQuant(_operand_from_dict(d[g]["a"]), _operand_from_dict(d[g]["b"]))
        if "high_precision" in d:
            kw["high_precision"] = HighPrecision(**d["high_precision"])
        if "switch_scope" in d:
            kw["switch_scope"] = SwitchScope(d["switch_scope"])
        for k in ("switch_to_bf16_at", "rht_seed", "seed"):
            if k in d:
                kw[k] = d[k]
        if d.get("accumulation") is not None:
            from .accumulation import Accumulation

            kw["accumulation"] = Accumulation(**d["accumulation"])
        return cls(**kw)

    def __str__(self) -> str:
        lines = [f"Recipe {self.name!r}"]
        what = {"fprop": "x  x W", "dgrad": "dy x W^T", "wgrad": "dy^T x x^T"}
        for g, q in self.gemms.items():
            lines.append(f"  {g:<6} {what[g]:<11} {q}")
        lines.append(f"  high precision: {self.high_precision}")
        if self.switch_to_bf16_at is not None:
            lines.append(f"  switch {self.switch_scope.value} to high precision at {self.switch_to_bf16_at:.0%}")
        lines.append(f"  seed {self.seed}, rht_seed {self.rht_seed:#x}")
        if self.accumulation is not None:
            lines.append(f"  accumulation {getattr(self.accumulation, 'name', self.accumulation)}")
        return "\n".join(lines)


# --- (de)serialising scheme configs ------------------------------------------------------------------------

_SCHEME_CLASSES = {"NVFP4Config": NVFP4Config, "MXConfig": MXConfig, "FP8Config": FP8Config}
_ENUM_FIELDS = {"scale_mode": ScaleMode, "four_over_six_error": ErrorMetric}


def _scheme_str(s: SchemeConfig) -> str:
    block = "" if s.block is None else f"{s.block[0]}x{s.block[1]}"
    if isinstance(s, NVFP4Config):
        return f"nvfp4[{block}{', 4/6' if s.four_over_six else ''}]"
    if isinstance(s, MXConfig):
        return f"{s.name}[{block}]"
    return f"fp8-{s.elem.name.lower()}[{block or 'tensor'}]"


def _scheme_to_dict(s: SchemeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(s).__name__}
    for f in fields(s):
        v = getattr(s, f.name)
        if isinstance(v, FloatFormat):
            v = v.name.lower()
        elif isinstance(v, enum.Enum):
            v = v.value
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def _scheme_from_dict(d: dict[str, Any]) -> SchemeConfig:
    d = dict(d)
    kind = d.pop("type", None)
    if kind not in _SCHEME_CLASSES:
        raise ValueError(f"unknown scheme type {kind!r}; known: {', '.join(_SCHEME_CLASSES)}")
    cls = _SCHEME_CLASSES[kind]
    kw: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        if f.name in ("elem", "scale_format"):
            v = get_format(v)
        elif f.name in _ENUM_FIELDS:
            v = _ENUM_FIELDS[f.name](v)
        elif f.name == "block":
            v = None if v is None else tuple(v)
        kw[f.name] = v
    return cls(**kw)


def _operand_to_dict(op: OperandQuant) -> dict[str, Any]:
    return {
        "scheme": None if op.scheme is None else _scheme_to_dict(op.scheme),
        "rounding": op.rounding.value,
        "rht": op.rht,
    }


def _operand_from_dict(d: dict[str, Any]) -> OperandQuant:
    scheme = None if d.get("scheme") is None else _scheme_from_dict(d["scheme"])
    return OperandQuant(scheme, Rounding(d.get("rounding", "nearest")), bool(d.get("rht", False)))


# --- named constructors --------------------------------------------------------------------------------------


def _uniform(name: str, act: OperandQuant, weight: OperandQuant, grad: OperandQuant, **kw) -> Recipe:
    """x and dy as ``act``/``grad`` along every reduction dim, W as ``weight`` in fprop and dgrad."""
    return Recipe(
        name=name,
        fprop=GemmQuant(act, weight),
        dgrad=GemmQuant(grad, weight),
        wgrad=GemmQuant(grad, act),
        **kw,
    )


def bf16() -> Recipe:
    """No quantization: every QuantLinear is ``F.linear`` (bit-identical to ``nn.Linear``)."""
    return Recipe(name="bf16")


def fp8(*, high_precision: HighPrecision = HighPrecision.none(), seed: int = DEFAULT_SEED) -> Recipe:
    """Per-tensor FP8: E4M3 for x and W, E5M2 for dy (the "hybrid" recipe), RNE, float32 scales."""
    fwd, grad = OperandQuant(FP8Config(E4M3)), OperandQuant(FP8Config(E5M2))
    return _uniform("fp8", fwd, fwd, grad, high_precision=high_precision, seed=seed)


def fp8_blockwise(
    *,
    high_precision: HighPrecision = HighPrecision.none(),
    accumulation: "Accumulation | None" = None,
    seed: int = DEFAULT_SEED,
    name: str = "fp8-blockwise",
) -> Recipe:
    """DeepSeek-V3: E4M3 everywhere; 1x128 tiles for x and dy, 128x128 blocks for W; float32 scales."""
    tile, block = OperandQuant(FP8Config(E4M3, block=(1, 128))), OperandQuant(FP8Config(E4M3, block=(128, 128)))
    return _uniform(name, tile, block, tile, high_precision=high_precision, accumulation=accumulation, seed=seed)


def mxfp4(*, high_precision: HighPrecision = HighPrecision(), seed: int = DEFAULT_SEED) -> Recipe:
    """OCP MXFP4 on all three GEMMs: E2M1 in 1x32 blocks with E8M0 scales, RNE, no RHT.

    Keeps the same high-precision blocks as ``nvfp4()`` by default, so the two compare like for like.
    """
    op = OperandQuant(MXConfig(E2M1))
    return _uniform("mxfp4", op, op, op, high_precision=high_precision, seed=seed)


def nvfp4(
    sr: bool = True,
    rht: bool = True,
    weight_2d: bool = True,
    four_over_six: bool = False,
    high_precision: HighPrecision = HighPrecision(),
    switch_to_bf16_at: float | None = None,
    switch_scope: SwitchScope | str = SwitchScope.FPROP,
    *,
    rht_seed: int = DEFAULT_RHT_SEED,
    seed: int = DEFAULT_SEED,
    name: str = "nvfp4",
) -> Recipe:
    """The NVFP4 pre-training recipe (arXiv 2509.25149); each argument switches one ingredient.

    sr         stochastic rounding of dy in dgrad and wgrad (the gradient operands only); RNE elsewhere
    rht        16-point RHT on both wgrad operands along the token dim, one sign vector (``rht_seed``)
    weight_2d  W in 16x16 blocks, quantized once and shared by fprop and dgrad (else 1x16 along each
               GEMM's reduction dim, so fprop and dgrad see different quantized W)
    four_over_six  per block, scale the amax to 4 or 6, whichever is more accurate (arXiv 2512.02010)
    """
    act = OperandQuant(NVFP4Config(four_over_six=four_over_six), rht=False)
    weight = OperandQuant(NVFP4Config(block=(16, 16) if weight_2d else (1, 16), four_over_six=four_over_six))
    rounding = Rounding.STOCHASTIC if sr else Rounding.NEAREST
    grad = OperandQuant(NVFP4Config(four_over_six=four_over_six), rounding)
    return Recipe(
        name=name,
        fprop=GemmQuant(act, weight),
        dgrad=GemmQuant(grad, weight),
        wgrad=GemmQuant(replace(grad, rht=rht), replace(act, rht=rht)),
        high_precision=high_precision,
        switch_to_bf16_at=switch_to_bf16_at,
        switch_scope=SwitchScope(switch_scope) if isinstance(switch_scope, str) else switch_scope,
        rht_seed=rht_seed,
        seed=seed,
    )


def _acc(**kw):
    from .accumulation import Accumulation

    return Accumulation(**kw)


_NAMED = {
    "bf16": bf16,
    "fp8": fp8,
    "fp8-blockwise": fp8_blockwise,
    "mxfp4": mxfp4,
    "nvfp4": nvfp4,
    "nvfp4-no-sr": lambda: nvfp4(sr=False, name="nvfp4-no-sr"),
    "nvfp4-no-rht": lambda: nvfp4(rht=False, name="nvfp4-no-rht"),
    "nvfp4-no-2d": lambda: nvfp4(weight_2d=False, name="nvfp4-no-2d"),
    "nvfp4-none": lambda: nvfp4(sr=False, rht=False, weight_2d=False, name="nvfp4-none"),
    "nvfp4+4over6": lambda: nvfp4(four_over_six=True, name="nvfp4+4over6"),
    "nvfp4+late-bf16": lambda: nvfp4(switch_to_bf16_at=LATE_BF16_AT, name="nvfp4+late-bf16"),
    "fp8-blockwise+acc14": lambda: fp8_blockwise(accumulation=_acc(bits=14), name="fp8-blockwise+acc14"),
    "fp8-blockwise+acc14-promote128": lambda: fp8_blockwise(
        accumulation=_acc(bits=14, promote_every=128), name="fp8-blockwise+acc14-promote128"
    ),
}

RECIPES: tuple[str, ...] = tuple(_NAMED)


def get_recipe(name: str | Recipe) -> Recipe:
    """A recipe by name (see ``RECIPES``); a ``Recipe`` passes through unchanged."""
    if isinstance(name, Recipe):
        return name
    if not isinstance(name, str):
        raise TypeError(f"recipe must be a name or a Recipe, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    if key not in _NAMED:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return _NAMED[key]()
