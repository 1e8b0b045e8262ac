"""Recipes: the named recipes say what the papers say, serialise losslessly, and reject bad values."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fourbit.recipes import (
    RECIPES,
    GemmQuant,
    HighPrecision,
    OperandQuant,
    Recipe,
    SwitchScope,
    get_recipe,
    nvfp4,
)
from fourbit.rounding import Rounding
from fourbit.schemes import FP8Config, MXConfig, NVFP4Config

OPERANDS = [("fprop", "a"), ("fprop", "b"), ("dgrad", "a"), ("dgrad", "b"), ("wgrad", "a"), ("wgrad", "b")]
#             fprop: x, W         dgrad: dy, W^T          wgrad: dy^T, x^T

RNE, SR = "nearest", "stochastic"
# Written out from the issue text / papers, operand by operand: (scheme, element, block, rounding, rht).
SPEC = {
    "fp8": [("fp8", "E4M3", None, RNE, False), ("fp8", "E4M3", None, RNE, False),
            ("fp8", "E5M2", None, RNE, False), ("fp8", "E4M3", None, RNE, False),
            ("fp8", "E5M2", None, RNE, False), ("fp8", "E4M3", None, RNE, False)],
    "fp8-blockwise": [("fp8-blockwise", "E4M3", (1, 128), RNE, False), ("fp8-blockwise", "E4M3", (128, 128), RNE, False),
                      ("fp8-blockwise", "E4M3", (1, 128), RNE, False), ("fp8-blockwise", "E4M3", (128, 128), RNE, False),
                      ("fp8-blockwise", "E4M3", (1, 128), RNE, False), ("fp8-blockwise", "E4M3", (1, 128), RNE, False)],
    "mxfp4": [("mxfp4", "E2M1", (1, 32), RNE, False)] * 6,
    "nvfp4": [("nvfp4", "E2M1", (1, 16), RNE, False), ("nvfp4", "E2M1", (16, 16), RNE, False),
              ("nvfp4", "E2M1", (1, 16), SR, False), ("nvfp4", "E2M1", (16, 16), RNE, False),
              ("nvfp4", "E2M1", (1, 16), SR, True), ("nvfp4", "E2M1", (1, 16), RNE, True)],
    "nvfp4-none": [("nvfp4", "E2M1", (1, 16), RNE, False)] * 6,
}


def _operand(recipe: Recipe, gemm: str, side: str) -> OperandQuant:
    return getattr(getattr(recipe, gemm), side)


@pytest.mark.parametrize("name", list(SPEC), ids=list(SPEC))
def test_named_recipe_matches_spec(name):
    recipe = get_recipe(name)
    for (gemm, side), (scheme, elem, block, rounding, rht) in zip(OPERANDS, SPEC[name]):
        op = _operand(recipe, gemm, side)
        where = f"{name} {gemm}.{side}"
        assert op.scheme.name == scheme, where
        assert op.scheme.elem.name == elem, where
        assert op.scheme.block == block, where
        assert op.rounding.value == rounding, where
        assert op.rht == rht, where


def test_bf16_quantizes_nothing():
    recipe = get_recipe("bf16")
    assert not recipe.quantized
    assert all(_operand(recipe, g, s).scheme is None for g, s in OPERANDS)


@pytest.mark.parametrize(
    "name, changed",
    [("nvfp4-no-sr", {"rounding"}), ("nvfp4-no-rht", {"rht"}), ("nvfp4-no-2d", {"block"}),
     ("nvfp4+4over6", {"four_over_six"})],
    ids=["no-sr", "no-rht", "no-2d", "4over6"],
)
def test_ablation_changes_one_ingredient(name, changed):
    """Each ablation differs from nvfp4 in exactly the one kind of field it names."""
    base, abl = get_recipe("nvfp4"), get_recipe(name)
    seen = set()
    for gemm, side in OPERANDS:
        a, b = _operand(base, gemm, side), _operand(abl, gemm, side)
        if a.rounding != b.rounding:
            seen.add("rounding")
        if a.rht != b.rht:
            seen.add("rht")
        if a.scheme.block != b.scheme.block:
            seen.add("block")
        if a.scheme.four_over_six != b.scheme.four_over_six:
            seen.add("four_over_six")
    assert seen == changed
    assert dataclasses.replace(abl, name="nvfp4") != base  # the difference is real


def test_late_switch_recipe():
    recipe = get_recipe("nvfp4+late-bf16")
    assert recipe.switch_to_bf16_at == 0.9 and recipe.switch_scope is SwitchScope.FPROP
    assert recipe.at(0.89) is recipe
    late = recipe.at(0.9)
    assert not late.fprop.quantized
    assert late.dgrad == recipe.dgrad and late.wgrad == recipe.wgrad
    everything = dataclasses.replace(recipe, switch_scope=SwitchScope.ALL).at(1.0)
    assert not everything.quantized


def test_accumulation_recipes():
    acc = pytest.importorskip("fourbit.accumulation")
    assert get_recipe("fp8-blockwise+acc14").accumulation == acc.Accumulation(bits=14)
    assert get_recipe("fp8-blockwise+acc14-promote128").accumulation == acc.Accumulation(bits=14, promote_every=128)
    assert get_recipe("fp8-blockwise").accumulation is None


@pytest.mark.parametrize("name", RECIPES, ids=RECIPES)
def test_round_trip_through_json(name):
    recipe = get_recipe(name)
    assert recipe.name == name
    back = Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
    assert back == recipe
    text = str(recipe)
    assert name in text and all(g in text for g in ("fprop", "dgrad", "wgrad"))


def test_round_trip_of_non_default_options():
    recipe = nvfp4(sr=False, high_precision=HighPrecision(2, 0.25, 3), switch_to_bf16_at=0.5,
                   switch_scope="all", rht_seed=7, seed=11, name="custom")
    recipe = dataclasses.replace(
        recipe, fprop=GemmQuant(OperandQuant(MXConfig(block=(1, 32))), OperandQuant(FP8Config(block=(128, 128))))
    )
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


@pytest.mark.parametrize(
    "n, expected",
    [(1, {0}), (2, {1}), (4, {3}), (6, {5}), (12, {10, 11}), (62, set(range(53, 62)))],
    ids=["n1", "n2", "n4", "n6", "n12", "n62"],
)
def test_high_precision_blocks(n, expected):
    """last max(1, round(0.15 n)): 6 -> round(0.9) = 1, 12 -> round(1.8) = 2, 62 -> round(9.3) = 9 (paper: 2 + 8)."""
    assert HighPrecision().blocks(n) == frozenset(expected)
    assert HighPrecision().fraction(n) == len(expected) / n
    assert HighPrecision.none().blocks(n) == frozenset()


def test_paper_high_precision_share():
    """The paper's 12B choice (first 2 + last 8 of 62) is 10/62 = 16.1%; the default keeps round(0.15 n) of n
    blocks, so its share is within rounding, 0.5/n, of 15% once that is at least one block (n >= 4)."""
    paper = HighPrecision(first_blocks=2, last_fraction=8 / 62)
    assert paper.blocks(62) == frozenset({0, 1, *range(54, 62)})
    for n in range(4, 200):
        assert abs(HighPrecision().fraction(n) - 0.15) <= 0.5 / n + 1e-12, n
    with pytest.raises(ValueError, match="positive int"):
        HighPrecision().fraction(0)


@pytest.mark.parametrize(
    "name, multiple",
    [("bf16", 1), ("fp8", 1), ("fp8-blockwise", 128), ("mxfp4", 32), ("nvfp4", 16), ("nvfp4-no-2d", 16)],
    ids=["bf16", "fp8", "fp8-blockwise", "mxfp4", "nvfp4", "nvfp4-no-2d"],
)
def test_feature_multiple(name, multiple):
    assert get_recipe(name).feature_multiple() == multiple


def test_unknown_recipe_lists_known():
    with pytest.raises(ValueError, match="known: bf16, fp8"):
        get_recipe("nvfp5")
    with pytest.raises(TypeError):
        get_recipe(4)


@pytest.mark.parametrize(
    "build",
    [
        lambda: OperandQuant(None, Rounding.STOCHASTIC),
        lambda: OperandQuant("nvfp4"),
        lambda: GemmQuant(OperandQuant(NVFP4Config(), rht=True), OperandQuant(NVFP4Config())),
        lambda: Recipe("x", fprop=GemmQuant(OperandQuant(NVFP4Config(), rht=True), OperandQuant(NVFP4Config(), rht=True))),
        lambda: Recipe("x", switch_to_bf16_at=1.5),
        lambda: Recipe("x", seed=-1),
        lambda: Recipe(""),
        lambda: HighPrecision(last_fraction=2.0),
        lambda: HighPrecision(first_blocks=-1),
        lambda: Recipe.from_dict({"name": "x", "colour": 1}),
    ],
    ids=["sr-unquantized", "scheme-str", "rht-one-side", "rht-fprop", "switch-1.5", "seed-neg", "no-name",
         "fraction-2", "first-neg", "unknown-key"],
)
def test_bad_values_raise(build):
    with pytest.raises((ValueError, TypeError)):
        build()


def test_stochastic_says_whether_any_operand_is_stochastically_rounded():
    """``Recipe.stochastic`` (whether layers need SR seeds): true exactly when some operand of some GEMM rounds
    stochastically; switching SR off in the NVFP4 recipe's one place makes it false."""
    import dataclasses

    from fourbit.recipes import OperandQuant, get_recipe, nvfp4
    from fourbit.rounding import Rounding

    assert nvfp4().stochastic and not nvfp4(sr=False).stochastic
    assert not get_recipe("bf16").stochastic and not get_recipe("fp8").stochastic
    fp8 = get_recipe("fp8")
    sr_dy = dataclasses.replace(fp8.dgrad, a=OperandQuant(fp8.dgrad.a.scheme, Rounding.STOCHASTIC))
    assert dataclasses.replace(fp8, dgrad=sr_dy).stochastic
