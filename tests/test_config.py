"""Options: unknown options, recipes and modes are errors that list what is known."""

import pytest
import torch

from qcompile.config import (
    DEFAULT_ACTIVATION_CLIP,
    GROUP_ACTIVATION_CLIP,
    RECIPES,
    Options,
    QCompileConfigError,
    known_options,
)
from tests.helpers import TinyMLP


def test_unknown_option_lists_known():
    with pytest.raises(QCompileConfigError) as info:
        Options.from_user(None, {"recipee": "w8a8"})
    for name in ("recipe", "debug_dir", "smooth", "rotate"):
        assert name in str(info.value)


def test_unknown_recipe_lists_recipes():
    with pytest.raises(QCompileConfigError) as info:
        Options.from_user(None, {"recipe": "w3a3"})
    for name in RECIPES:
        assert name in str(info.value)


def test_unknown_mode():
    with pytest.raises(QCompileConfigError, match="max-autotune"):
        Options.from_user("reduce-overhead", {})


def test_bad_values():
    with pytest.raises(QCompileConfigError, match="observer"):
        Options.from_user(None, {"observer": "magic"})
    with pytest.raises(QCompileConfigError, match="True/False"):
        Options.from_user(None, {"rotate": "yes"})
    with pytest.raises(QCompileConfigError, match="smooth_alpha"):
        Options.from_user(None, {"smooth_alpha": 2.0})


def test_recipe_defaults_and_switches():
    opts = Options.from_user(None, {"recipe": "w4a4"})
    assert opts.transform_on("rotate") and opts.transform_on("gptq") and opts.needs_calibration
    opts = Options.from_user(None, {"recipe": "w4a4", "gptq": False, "rotate": False,
                                    "smooth": False})
    assert not opts.transform_on("gptq") and not opts.transform_on("rotate")
    # w4a4: int4 per-token dynamic activations (QuaRot): calibration only for GPTQ's Hessians
    w4a4 = RECIPES["w4a4"]
    assert (w4a4.act.bits, w4a4.act.dynamic, w4a4.requant) == (4, True, "float")
    assert not opts.needs_calibration
    static = RECIPES["w4a4-static"]  # the integer-only variant: static per-tensor int4
    assert (static.act.bits, static.act.dynamic, static.requant) == (4, False, "dyadic")
    assert Options.from_user(None, {"recipe": "w4a4-static", "gptq": False}).needs_calibration
    assert not Options.from_user(None, {}).needs_calibration  # w8a8 is dynamic
    assert Options.from_user("max-autotune", {}).autotune
    assert "recipe" in known_options()


def test_backend_rejects_unknown_option_through_torch_compile():
    cm = torch.compile(TinyMLP().eval(), backend="qcompile", options={"nope": 1})
    with pytest.raises(Exception, match="known options"):
        cm(torch.randn(2, 16))


def test_activation_clip_default_option_and_fingerprint():
    """w4a4's per-token int4 activations are clipped at the recipe's ratio unless the option
    says otherwise; the ratio is part of the fingerprint there, and only there."""
    w4a4 = Options.from_user(None, {"recipe": "w4a4"})
    assert w4a4.act_clip == RECIPES["w4a4"].activation_clip == DEFAULT_ACTIVATION_CLIP
    assert Options.from_user(None, {"recipe": "w4a4", "activation_clip": 1}).act_clip == 1.0
    other = Options.from_user(None, {"recipe": "w4a4", "activation_clip": 0.95})
    assert other.act_clip == 0.95 and other.fingerprint() != w4a4.fingerprint()
    same = Options.from_user(None, {"recipe": "w4a4", "activation_clip": DEFAULT_ACTIVATION_CLIP})
    assert same.fingerprint() == w4a4.fingerprint()
    w8a8 = Options.from_user(None, {})
    assert w8a8.act_clip == 1.0 and "act_clip" not in w8a8.fingerprint()
    assert [n for n, r in RECIPES.items() if r.per_token_int4] == ["w4a4"]


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.5, float("nan"), "0.9", True])
def test_activation_clip_out_of_range_says_what_to_give(value):
    with pytest.raises(QCompileConfigError) as info:
        Options.from_user(None, {"recipe": "w4a4", "activation_clip": value})
    message = str(info.value)
    assert "activation_clip must be a number in (0, 1]" in message and "1.0: no clipping" in message
    assert repr(value) in message


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-static", "w4a16", "w4a8", "w4a4-static",
                                    "mixed", "float"])
def test_activation_clip_belongs_to_per_token_int4_recipes(recipe):
    options = {"recipe": recipe, "activation_clip": 0.9}
    if recipe == "mixed":
        options["budget"] = {"a16": 0.1}
    with pytest.raises(QCompileConfigError) as info:
        Options.from_user(None, options)
    message = str(info.value)
    assert f"recipe {recipe!r} has none" in message and "'recipe': 'w4a4'" in message


def test_activation_group_size_groups_w4a4s_activations_symmetrically():
    """activation_group_size: w4a4's int4 activations in groups (symmetric, clipped at the
    groups' own default unless activation_clip says otherwise), in the fingerprint only
    when given; per token (group 0) by default."""
    w4a4 = Options.from_user(None, {"recipe": "w4a4"})
    assert w4a4.act_group == 0 and not w4a4.act_symmetric
    grouped = Options.from_user(None, {"recipe": "w4a4", "activation_group_size": 16})
    assert grouped.act_group == 16 and grouped.act_symmetric
    assert grouped.act_clip == GROUP_ACTIVATION_CLIP
    assert "activation_group_size=16" in grouped.fingerprint()
    assert "activation_group_size" not in w4a4.fingerprint()
    clipped = Options.from_user(None, {"recipe": "w4a4", "activation_group_size": 24,
                                       "activation_clip": 1.0})
    assert clipped.act_clip == 1.0 and clipped.act_group == 24


@pytest.mark.parametrize("options, says", [
    ({"recipe": "w4a8", "activation_group_size": 16}, "recipe 'w4a8' has none"),
    ({"recipe": "w4a4", "activation_group_size": 1}, "must be an int >= 2"),
    ({"recipe": "w4a4", "activation_group_size": "16"}, "must be an int >= 2"),
    ({"recipe": "w4a4", "activation_group_size": True}, "must be an int >= 2"),
    ({"recipe": "w4a4", "activation_group_size": 16, "activation_symmetric": False},
     "drop activation_symmetric=False"),
])
def test_bad_activation_group_sizes_say_what_to_give(options, says):
    with pytest.raises(QCompileConfigError, match=says) as info:
        Options.from_user(None, options)
    assert "'activation_group_size': 16" in str(info.value) or "symmetric" in str(info.value)


def test_group_size_option_groups_int4_weights_and_enters_the_fingerprint():
    """options group_size: the recipe's group size (w4a16's 128, w4a8's and w4a4's 32)
    unless given; w4a4-static takes one (integer group multipliers); "channel" asks for one
    scale per output channel; the fingerprint names it only when given, so every other
    configuration keeps its fingerprint."""
    assert Options.from_user(None, {"recipe": "w4a16"}).weight_group_size == 128
    assert Options.from_user(None, {"recipe": "w4a8"}).weight_group_size == 32
    assert Options.from_user(None, {"recipe": "w4a4"}).weight_group_size == 32
    assert Options.from_user(None, {"recipe": "w4a4-static"}).weight_group_size is None
    for recipe in ("w4a4", "w4a8", "w4a16"):
        channel = Options.from_user(None, {"recipe": recipe, "group_size": "channel"})
        assert channel.weight_group_size is None
        assert channel.fingerprint() != Options.from_user(None, {"recipe": recipe}).fingerprint()
    w4a8 = Options.from_user(None, {"recipe": "w4a8", "group_size": 32})
    assert w4a8.weight_group_size == 32
    assert "group_size" in w4a8.fingerprint()
    assert "group_size" not in Options.from_user(None, {"recipe": "w4a8"}).fingerprint()
    assert Options.from_user(None, {"recipe": "w4a4-static", "group_size": 64}).group_size == 64
    mixed = Options.from_user(None, {"recipe": "mixed", "budget": {"weight_bits": 5},
                                     "group_size": 32})  # its int4 layers
    assert mixed.weight_group_size == 32


@pytest.mark.parametrize("recipe, why", [
    ("w8a8", "not int4"), ("w8a8-static", "not int4"), ("float", "not int4")])
def test_group_size_belongs_to_int4_recipes_with_group_scales(recipe, why):
    with pytest.raises(QCompileConfigError) as info:
        Options.from_user(None, {"recipe": recipe, "group_size": 32})
    message = str(info.value)
    assert "'group_size' groups int4 weights" in message and why in message
    for grouped in ("'w4a8'", "'w4a16'", "'w4a4'", "'w4a4-static'", "'mixed'"):
        assert grouped in message


def test_group_wise_int4_weights_are_asymmetric_unless_told():
    """weight_symmetric: group-wise int4 weights take a zero point per group unless it is
    True; the fingerprint names it only when given."""
    assert not Options.from_user(None, {"recipe": "w4a8"}).group_weights_symmetric
    assert not Options.from_user(None, {"recipe": "w4a16"}).group_weights_symmetric
    sym = Options.from_user(None, {"recipe": "w4a8", "weight_symmetric": True})
    assert sym.group_weights_symmetric and "weight_symmetric" in sym.fingerprint()
    assert "weight_symmetric" not in Options.from_user(None, {"recipe": "w4a8"}).fingerprint()
    assert Options.from_user(None, {"recipe": "w4a4", "group_size": 16,
                                    "weight_symmetric": False}).weight_symmetric is False
    # w4a16 per channel is one group per row: symmetric or not, as told
    assert Options.from_user(None, {"recipe": "w4a16", "group_size": "channel",
                                    "weight_symmetric": True}).group_weights_symmetric


@pytest.mark.parametrize("options, match", [
    ({"recipe": "w8a8", "weight_symmetric": True}, "has none without option 'group_size'"),
    ({"recipe": "float", "weight_symmetric": True}, "has none without option 'group_size'"),
    ({"recipe": "w4a4-static", "weight_symmetric": False},
     "has none without option 'group_size'"),
    ({"recipe": "w4a4", "group_size": "channel", "weight_symmetric": True},
     "has none with group_size 'channel'"),
    ({"recipe": "w4a8", "weight_symmetric": 1}, "weight_symmetric must be True"),
    ({"recipe": "w4a8", "weight_symmetric": "no"}, "weight_symmetric must be True"),
])
def test_weight_symmetric_belongs_to_group_wise_int4_weights(options, match):
    with pytest.raises(QCompileConfigError, match=match):
        Options.from_user(None, options)


@pytest.mark.parametrize("value", [0, 3, -32, 32.0, "32", True, "per_channel", -1])
def test_group_size_must_be_an_even_int(value):
    with pytest.raises(QCompileConfigError, match="group_size must be an even int"):
        Options.from_user(None, {"recipe": "w4a8", "group_size": value})


def test_quantize_attention_option():
    base = Options.from_user(None, {"recipe": "w8a8"})
    assert base.quantize_attention is None and "quantize_attention" not in base.fingerprint()
    for value in (True, False):
        opts = Options.from_user(None, {"recipe": "w8a8", "quantize_attention": value})
        assert f"quantize_attention={value!r}" in opts.fingerprint()
    with pytest.raises(QCompileConfigError, match="True/False"):
        Options.from_user(None, {"recipe": "w8a8", "quantize_attention": "yes"})
    with pytest.raises(QCompileConfigError, match="needs quantized activations.*'w4a16'"):
        Options.from_user(None, {"recipe": "w4a16", "quantize_attention": True})
    assert Options.from_user(None, {"recipe": "w4a16", "quantize_attention": False})
