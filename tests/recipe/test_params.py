"""Parameter values (docs/recipe.md §3): gradients, step lists, conditionals, layer positions."""

import pytest

from mergekit_like.errors import MergeError
from mergekit_like.recipe.params import (NO_VALUE, Conditional, Gradient, Scalar, SettingFormError,
                                         Steps, Structured, canonical, config_num_layers,
                                         evaluate, interpolate, layer_index, layer_positions,
                                         layer_stacks, parse_setting, step_value)


def formula(L, t):
    """docs/recipe.md §3, written out independently of the implementation."""
    n = len(L)
    s = t * (n - 1)
    i0 = int(s)
    i1 = min(n - 1, i0 + 1)
    f = s - i0
    return (1 - f) * L[i0] + f * L[i1]


def llama_names(n_layers):
    names = ["model.embed_tokens.weight"]
    for i in range(n_layers):
        names += [f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.mlp.up_proj.weight",
                  f"model.layers.{i}.input_layernorm.weight"]
    return names + ["model.norm.weight", "lm_head.weight"]


def test_worked_example_table():
    """5 layers, density [1.0, 0.7, 0.1]: docs/recipe.md §3 table."""
    names = llama_names(5)
    pos = layer_positions(names, 5)
    density = parse_setting([1.0, 0.7, 0.1])
    assert isinstance(density, Gradient)
    expect_t = {"model.embed_tokens.weight": 0.0, "model.layers.0.mlp.up_proj.weight": 0.0,
                "model.layers.1.mlp.up_proj.weight": 0.25, "model.layers.2.mlp.up_proj.weight": 0.5,
                "model.layers.3.mlp.up_proj.weight": 0.75, "model.layers.4.mlp.up_proj.weight": 1.0,
                "model.norm.weight": 0.0, "lm_head.weight": 0.0}
    expect_v = {"model.embed_tokens.weight": 1.0, "model.layers.0.mlp.up_proj.weight": 1.0,
                "model.layers.1.mlp.up_proj.weight": 0.85, "model.layers.2.mlp.up_proj.weight": 0.7,
                "model.layers.4.mlp.up_proj.weight": 0.1, "model.norm.weight": 1.0,
                "lm_head.weight": 1.0}
    for name, t in expect_t.items():
        assert pos[name] == t, name
        v = evaluate(density, name, pos[name])
        # bit for bit with the formula
        assert v == formula([1.0, 0.7, 0.1], t) and type(v) is float
        if name in expect_v:
            assert v == expect_v[name], name
    # layer 3: s = 1.5 -> 0.5*0.7 + 0.5*0.1, which in binary floats is 0.39999999999999997
    v3 = evaluate(density, "model.layers.3.mlp.up_proj.weight", 0.75)
    assert v3 == (1 - 0.5) * 0.7 + 0.5 * 0.1 == 0.39999999999999997
    assert v3 == pytest.approx(0.4, abs=1e-15)


@pytest.mark.parametrize("L", [[1.0], [0.0, 1.0], [0.3, 0.9, 0.2, 0.55], [1, 2, 3], [-1.5, 2.25]])
def test_gradient_matches_formula_bit_for_bit(L):
    for k in range(0, 41):
        t = k / 40
        assert interpolate(L, t) == formula(L, t)
    for n_layers in (1, 2, 3, 7, 32):
        for i in range(n_layers):
            t = i / (n_layers - 1) if n_layers > 1 else 1
            assert interpolate([float(x) for x in L], t) == formula(L, t)


def test_gradient_single_and_two_points():
    assert interpolate([0.3], 0.7) == 0.3
    assert interpolate([0.0, 1.0], 0.25) == 0.25
    assert interpolate([0.0, 1.0], 1.0) == 1.0


def test_step_list():
    s = parse_setting(["a", "b", "c"])
    assert isinstance(s, Steps)
    assert [evaluate(s, "x", t) for t in (0.0, 0.25, 0.49, 0.5, 0.99, 1.0)] == \
        ["a", "a", "a", "b", "b", "c"]
    assert step_value(["x", "y"], 0.999) == "x"
    assert step_value([True, False], 1.0) is False


def test_conditional_first_substring_match_wins():
    s = parse_setting([{"filter": "mlp", "value": 0.5}, {"filter": "self_attn", "value": 0.2},
                       {"value": 0.3}])
    assert isinstance(s, Conditional)
    assert evaluate(s, "model.layers.0.mlp.up_proj.weight", 0.0) == 0.5
    assert evaluate(s, "model.layers.0.self_attn.q_proj.weight", 0.0) == 0.2
    assert evaluate(s, "model.embed_tokens.weight", 0.0) == 0.3
    # first match wins, even when a later filter matches too
    s2 = parse_setting([{"filter": "layers", "value": 1.0}, {"filter": "mlp", "value": 2.0}])
    assert evaluate(s2, "model.layers.1.mlp.down_proj.weight", 0.0) == 1.0


def test_conditional_filters_are_plain_substrings_not_regex():
    s = parse_setting([{"filter": "layers.1.", "value": 1.0}, {"filter": "mlp.*", "value": 2.0},
                       {"filter": "*", "value": 3.0}])
    assert evaluate(s, "model.layers.1.mlp.w", 0) == 1.0
    assert evaluate(s, "model.layers.11.mlp.w", 0) == 3.0  # 'layers.1.' is not in 'layers.11.'
    assert evaluate(s, "model.layersX1Xmlp.w", 0) == 3.0  # '.' is not a regex wildcard
    assert evaluate(parse_setting([{"filter": "mlp", "value": 1}]), "lm_head.weight", 0) is NO_VALUE


def test_conditional_value_may_be_gradient():
    s = parse_setting([{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}])
    assert evaluate(s, "model.layers.3.mlp.w", 0.75) == 0.75
    assert evaluate(s, "model.layers.3.attn.w", 0.75) == 0.5


def test_single_filter_map_is_one_element_list():
    s = parse_setting({"filter": "mlp", "value": 0.5})
    assert isinstance(s, Conditional) and len(s.entries) == 1 and s.single
    assert evaluate(s, "a.mlp.b", 0) == 0.5
    assert evaluate(s, "a.attn.b", 0) is NO_VALUE
    assert canonical(s) == [{"filter": "mlp", "value": 0.5}]


def test_scalar_and_structured():
    assert isinstance(parse_setting(0.5), Scalar)
    assert evaluate(parse_setting("l1"), "x", 0.3) == "l1"
    st = parse_setting({"merge_method": "ties", "parameters": {"lambda": 0.3}}, structured=True)
    assert isinstance(st, Structured)
    assert evaluate(st, "x", 0.5) == {"merge_method": "ties", "parameters": {"lambda": 0.3}}


@pytest.mark.parametrize("raw,sub", [
    ([], ()),
    ([[1, 2]], (0,)),
    ([{"filter": "a", "value": 1}, 0.5], (1,)),
    ([{"filter": "a"}], (0,)),
    ([{"filter": 3, "value": 1}], (0, "filter")),
    ([{"filter": "a", "value": 1, "extra": 2}], (0, "extra")),
    ({"value": 1, "weight": 2}, ()),
    ([{"filter": "a", "value": {"filter": "b", "value": 1}}], (0, "value")),
])
def test_malformed_settings(raw, sub):
    with pytest.raises(SettingFormError) as exc:
        parse_setting(raw)
    assert exc.value.subpath == sub


def test_layer_index():
    assert layer_index("model.layers.3.mlp.up_proj.weight") == ("model.layers", 3)
    assert layer_index("transformer.h.11.attn.c_attn.weight") == ("transformer.h", 11)
    assert layer_index("encoder.layer.0.attention.self.query.weight") == ("encoder.layer", 0)
    assert layer_index("blocks.2.norm.weight") == ("blocks", 2)
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("lm_head.weight") is None
    assert layer_index("model.mylayers.3.x") is None  # the stack word must be a whole segment
    assert layer_index("model.layers.3") is None  # needs a '.' after the index


def test_layer_positions_multiple_stacks_and_single_layer():
    names = ["vision.blocks.0.w", "vision.blocks.1.w", "vision.blocks.2.w",
             "model.layers.0.w", "model.layers.1.w", "model.layers.2.w", "model.layers.3.w",
             "model.layers.4.w", "head.w"]
    pos = layer_positions(names, 5)
    assert pos["vision.blocks.1.w"] == 0.5  # own stack: N = 3
    assert pos["model.layers.1.w"] == 0.25
    assert pos["head.w"] == 0.0
    assert layer_stacks(names) == {"vision.blocks": 3, "model.layers": 5}
    assert layer_positions(["model.layers.0.w", "lm_head.weight"], 1) == \
        {"model.layers.0.w": 1.0, "lm_head.weight": 0.0}
    assert layer_positions(["a.w", "b.w"], 12) == {"a.w": 0.0, "b.w": 0.0}


def test_layer_positions_disagrees_with_config():
    with pytest.raises(MergeError, match=r"org/m: the largest layer stack 'model.layers' has 5 "
                                         r"layers but config.json says 4"):
        layer_positions(llama_names(5), 4, source="org/m")
    assert layer_positions(llama_names(5), None)["model.layers.4.mlp.up_proj.weight"] == 1.0


def test_config_num_layers():
    assert config_num_layers({"num_hidden_layers": 32}) == 32
    assert config_num_layers({"n_layer": 12}) == 12
    assert config_num_layers({"num_layers": 6}) == 6
    assert config_num_layers({"text_config": {"num_hidden_layers": 4}}) == 4
    assert config_num_layers({}) is None and config_num_layers(None) is None
