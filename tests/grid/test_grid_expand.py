"""Grid expansion (docs/grid.md §1–2, §7 partition; tests §10 items 1, 2 and 7): counts and order,
zip, exclude, paths, errors, duplicates, ids, labels, strict/non-strict, partition.

Pure and fast: models are Hub-style ids (phase A never touches the network)."""

import textwrap

import pytest

from mergekit_like.errors import MergeError
from mergekit_like.grid import (get_path, load_grid, load_grid_text, partition, set_path,
                                short_keys)
from mergekit_like.grid.paths import PathError, short_value

BASE = """\
merge_method: ties
base_model: org/base-1b
models:
  - {model: org/math-1b, parameters: {weight: 1.0, density: 0.5}}
  - {model: org/code-1b, parameters: {weight: 1.0, density: 0.5}}
parameters: {lambda: 1.0, normalize: true}
dtype: float32
out_dtype: bfloat16
"""

SPEC_EXAMPLE = BASE + """\
grid:
  parameters.lambda: [0.6, 0.8, 1.0]
  models.0.parameters.density: [0.3, 0.5, 0.7]
zip:
  - merge_method: [ties, dare_ties]
    parameters.normalize: [true, false]
exclude:
  - {merge_method: dare_ties, parameters.lambda: 1.0}
label: "{merge_method} λ={parameters.lambda} d0={models.0.parameters.density}"
"""

TA = """\
merge_method: task_arithmetic
base_model: org/base
models:
  - {model: org/a, parameters: {weight: 1.0}}
  - {model: org/b, parameters: {weight: 0.5}}
"""


def grid(extra: str = "", base: str = TA, **kw):
    return load_grid_text(base + textwrap.dedent(extra), "g.yml", **kw)


def error(extra: str, base: str = TA, **kw) -> str:
    with pytest.raises(MergeError) as info:
        grid(extra, base, **kw)
    msg = str(info.value)
    assert "\n" not in msg and info.value.exit_code == 2
    return msg


# ---------------------------------------------------------------- counts, order, zip, exclude

def test_spec_example_counts_and_order():
    g = load_grid_text(SPEC_EXAMPLE, "sweep.yml")
    assert len(g.points) == 15 and g.warnings == [] and g.invalid == []
    assert g.varied == ["parameters.lambda", "models.0.parameters.density", "merge_method",
                        "parameters.normalize"]
    assert [p.index for p in g.points] == list(range(15))
    # last axis (the zip group) fastest; λ=1.0 with dare_ties excluded
    expected = [(lam, d, m) for lam in (0.6, 0.8, 1.0) for d in (0.3, 0.5, 0.7)
                for m in ("ties", "dare_ties") if not (lam == 1.0 and m == "dare_ties")]
    got = [(p.values["parameters.lambda"], p.values["models.0.parameters.density"],
            p.values["merge_method"]) for p in g.points]
    assert got == expected
    assert list(g.points[0].values) == g.varied
    assert g.points[0].label == "ties λ=0.6 d0=0.3"
    assert g.points[1].label == "dare_ties λ=0.6 d0=0.3"
    assert len({p.id for p in g.points}) == 15 and all(len(p.id) == 12 for p in g.points)
    assert g.text == SPEC_EXAMPLE


def test_zip_lock_step_and_point_documents():
    g = load_grid_text(SPEC_EXAMPLE, "sweep.yml")
    for p in g.points:
        assert p.recipe.merge_method == p.values["merge_method"]
        assert p.doc["parameters"]["normalize"] is (p.values["merge_method"] == "ties")
        assert p.doc["models"][0]["parameters"]["density"] == \
            p.values["models.0.parameters.density"]
        assert p.doc["models"][1]["parameters"]["density"] == 0.5  # untouched
        assert not set(p.doc) & {"grid", "zip", "exclude", "label"}
        assert p.recipe.text == p.text and "grid" not in p.text
        assert load_grid_text(p.text, "point.yml").points[0].id == p.id
    # documents are independent copies
    g.points[0].doc["models"][1]["parameters"]["density"] = 0.9
    assert g.points[1].doc["models"][1]["parameters"]["density"] == 0.5


def test_exclude_any_of_list_and_unvaried_path():
    g = grid("""
        grid:
          parameters.lambda: [0.5, 1, 2]
          models.1.parameters.weight: [0.25, 0.5]
        exclude:
          - {parameters.lambda: [0.5, 2.0]}
          - {parameters.lambda: 1.0, models.0.parameters.weight: 1, models.1.parameters.weight: 0.5}
        """)
    assert [tuple(p.values.values()) for p in g.points] == [(1, 0.25)]
    assert g.warnings == []


def test_exclude_exact_list_value_and_missing_rule_warning():
    g = grid("""
        grid:
          models.0.parameters.weight: [[0, 0.5, 1], [1, 1, 1], 0.5]
        exclude:
          - {models.0.parameters.weight: [[0.0, 0.5, 1.0]]}
          - {merge_method: linear}
        """)
    assert [p.values["models.0.parameters.weight"] for p in g.points] == [[1, 1, 1], 0.5]
    assert len(g.warnings) == 1 and "exclude[1]" in g.warnings[0] and "matches no point" \
        in g.warnings[0]


def test_exclude_bool_is_not_a_number():
    g = grid("""
        grid:
          parameters.normalize: [true, false]
        exclude:
          - {parameters.normalize: 1}
        """)
    assert len(g.points) == 2


def test_every_point_excluded_is_an_error():
    msg = error("""
        grid:
          parameters.lambda: [1, 2]
        exclude:
          - {merge_method: task_arithmetic}
        """)
    assert msg.startswith("g.yml:9 exclude:") and "every one of the 2 points" in msg


# ---------------------------------------------------------------- paths

def test_list_index_path_and_created_mapping():
    g = grid("""
        grid:
          models.1.parameters.weight: [0.1, 0.2]
          parameters.lambda: [0.5]
        """)
    assert "\nparameters" not in TA
    assert [p.doc["models"][1]["parameters"]["weight"] for p in g.points] == [0.1, 0.2]
    assert all(p.doc["parameters"] == {"lambda": 0.5} for p in g.points)
    assert g.points[0].recipe.resolved()["parameters"]["lambda"] == 0.5


def test_path_helpers():
    doc = {"a": [{"b": 1}], "n": None}
    assert set_path(doc, "a.0.c.d", 2) == ("a", 0, "c", "d")
    assert doc["a"][0] == {"b": 1, "c": {"d": 2}}
    set_path(doc, "n.x", 3)
    assert doc["n"] == {"x": 3}
    assert get_path(doc, "a.0.b") == 1
    with pytest.raises(PathError, match="index 1 is out of range at 'a.1'"):
        set_path(doc, "a.1.b", 0)
    with pytest.raises(PathError, match="'a.0.b' is a scalar"):
        set_path(doc, "a.0.b.c", 0)
    with pytest.raises(PathError, match="must be an index"):
        set_path(doc, "a.x", 0)
    with pytest.raises(PathError, match="empty segment"):
        set_path(doc, "a..b", 0)


@pytest.mark.parametrize("extra, line, needle", [
    ("grid:\n  models.5.parameters.weight: [1]\n", 7,
     "grid 'models.5.parameters.weight': path 'models.5.parameters.weight': index 5 is out of "
     "range at 'models.5' ('models' has 2 items"),
    ("grid:\n  merge_method.x: [1]\n", 7,
     "path 'merge_method.x': 'merge_method' is a scalar ('task_arithmetic')"),
    ("grid:\n  models.0.model.path: [org/x]\n", 7, "'models.0.model' is a scalar ('org/a')"),
    ("grid:\n  grid.x: [1]\n", 7, "path 'grid.x' may not start with 'grid'"),
    ("zip:\n  - {label.x: [1]}\n", 7, "path 'label.x' may not start with 'label'"),
    ("exclude:\n  - {zip: 1}\n", 7, "path 'zip' may not start with 'zip'"),
    ("label: '{exclude.a}'\n", 6, "path 'exclude.a' may not start with 'exclude'"),
    ("grid:\n  parameters.lambda: [1, 2]\nzip:\n  - {parameters.lambda: [3, 4]}\n", 9,
     "zip[0] 'parameters.lambda': path 'parameters.lambda' is already on another axis (line 7)"),
    ("grid:\n  parameters: [{lambda: 1}]\n  parameters.lambda: [3, 4]\n", 8,
     "path 'parameters.lambda' overlaps 'parameters' on another axis (line 7)"),
    ("zip:\n  - merge_method: [ties, dare_ties]\n    parameters.lambda: [1, 2, 3]\n", 7,
     "zip[0]: the lists of a zip group must have equal lengths (merge_method: 2, "
     "parameters.lambda: 3)"),
    ("grid:\n  parameters.lambda: 1\n", 7, "expected a list of candidate values"),
    ("grid:\n  parameters.lambda: []\n", 7, "the list of candidate values is empty"),
    ("grid: [1]\n", 6, "grid: expected a mapping"),
    ("label: '{parameters.rescale}'\n", 6, "placeholder {parameters.rescale} names no value"),
])
def test_bad_grid_errors_name_file_line_and_path(extra, line, needle):
    msg = error(extra)
    assert msg.startswith(f"g.yml:{line} "), msg
    assert needle in msg, msg


def test_unknown_path_is_created_then_rejected_by_the_schema():
    msg = error("grid:\n  paramters.lambda: [1]\n")
    assert "1 of 1 points are invalid" in msg and "paramters" in msg


# ---------------------------------------------------------------- duplicates and ids

def test_duplicates_collapse_with_a_warning():
    g = grid("""
        grid:
          parameters.lambda: [1, 1.0, 2]
        """)
    assert [p.label for p in g.points] == ["lambda=1", "lambda=2"]
    assert [p.index for p in g.points] == [0, 1]
    assert len(g.warnings) == 1
    assert "'lambda=1' and 'lambda=1.0'" in g.warnings[0] and "same resolved recipe" \
        in g.warnings[0]


def test_default_value_collapses_with_unset():
    g = grid("grid:\n  parameters.lambda: [1.0]\nzip:\n  - {parameters.normalize: [false]}\n")
    plain = load_grid_text(TA, "r.yml")
    assert g.points[0].id == plain.points[0].id  # defaults filled in before hashing


def test_id_stable_across_key_order_and_int_float():
    a = load_grid_text(TA + "parameters: {lambda: 1, normalize: false}\n", "a.yml").points[0]
    b = load_grid_text("""\
parameters: {normalize: false, lambda: 1.0}
models:
  - {parameters: {weight: 1}, model: org/a}
  - {model: org/b, parameters: {weight: 0.5}}
base_model: org/base
merge_method: task_arithmetic
""", "b.yml").points[0]
    c = load_grid_text(TA + "parameters: {lambda: 0.9}\n", "c.yml").points[0]
    assert a.id == b.id
    assert a.id != c.id
    assert a.id == a.recipe.resolved_hash()[:12]


def test_id_follows_pinned_sha():
    p = grid("grid:\n  parameters.lambda: [1]\n").points[0]
    before = p.id
    p.recipe.inputs[0].ref.sha = "a" * 40
    assert p.id != before


# ---------------------------------------------------------------- labels

def test_default_labels_use_short_keys():
    g = grid("""
        grid:
          parameters.lambda: [0.8]
          models.0.parameters.weight: [0.5]
          models.1.parameters.weight: [[0, 0.5, 1]]
        zip:
          - {base_model: [org/base]}
        """)
    assert g.points[0].label == ("lambda=0.8,0.parameters.weight=0.5,"
                                 "1.parameters.weight=[0,0.5,1],base_model=org/base")


def test_label_template_and_plain_recipe():
    g = grid("""
        grid:
          parameters.lambda: [0.5, 2]
        label: "{merge_method}/λ{parameters.lambda}/w={models.1.parameters.weight}"
        """)
    assert [p.label for p in g.points] == ["task_arithmetic/λ0.5/w=0.5",
                                           "task_arithmetic/λ2/w=0.5"]
    plain = load_grid_text(TA, "r.yml")
    assert len(plain.points) == 1 and plain.varied == [] and plain.points[0].values == {}
    assert plain.points[0].label == "(recipe)"


def test_short_keys_and_values():
    assert short_keys(["parameters.lambda", "models.0.parameters.density",
                       "models.1.parameters.density"]) == {
        "parameters.lambda": "lambda", "models.0.parameters.density": "0.parameters.density",
        "models.1.parameters.density": "1.parameters.density"}
    assert short_keys(["a.b", "b"]) == {"a.b": "a.b", "b": "b"}
    assert short_keys([]) == {}
    assert [short_value(v) for v in (0.5, 1, True, None, "org/x", [0, 0.5], {"a": 1})] == \
        ["0.5", "1", "true", "null", "org/x", "[0,0.5]", "{a:1}"]


# ---------------------------------------------------------------- invalid points

INVALID = """
grid:
  models.0.parameters.weight: [1.0, oops, bad]
  parameters.lambda: [1, 2]
"""


def test_strict_lists_every_invalid_point():
    msg = error(INVALID)
    assert msg.startswith("g.yml: 4 of 6 points are invalid: ")
    for label in ("weight=oops,lambda=1", "weight=oops,lambda=2", "weight=bad,lambda=1",
                  "weight=bad,lambda=2"):
        assert f"{label}: g.yml:8 models[0].parameters.weight: expected a number" in msg
    assert msg.count("; ") == 3


def test_non_strict_keeps_valid_points():
    g = grid(INVALID, strict=False)
    assert [p.label for p in g.points] == ["weight=1.0,lambda=1", "weight=1.0,lambda=2"]
    assert [label for label, _ in g.invalid] == ["weight=oops,lambda=1", "weight=oops,lambda=2",
                                                 "weight=bad,lambda=1", "weight=bad,lambda=2"]
    assert g.warnings == []          # invalid points are failed rows (run.py), not warnings
    assert all(p.message.startswith("g.yml:8 models[0].parameters.weight: expected a number")
               for p in g.invalid_points)


def test_plain_invalid_recipe_keeps_its_own_error():
    msg = error("", base="merge_method: ties\nbase_model: org/base\n")
    assert "invalid" not in msg and msg.startswith("g.yml:")
    assert error("", base="") == "g.yml: the recipe is empty"


def test_load_grid_from_file(tmp_path):
    (tmp_path / "base").mkdir()
    path = tmp_path / "sweep.yml"
    path.write_text(f"merge_method: linear\nmodels:\n  - {{model: {tmp_path / 'base'}}}\n"
                    "  - {model: org/b}\nparameters: {weight: 1}\n"
                    "grid:\n  models.1.parameters.weight: [0.5, 2]\n", encoding="utf-8")
    g = load_grid(path, seed=7)
    assert g.path == path and len(g.points) == 2
    assert all(p.recipe.seed == 7 and p.recipe.inputs[0].ref.is_local for p in g.points)
    with pytest.raises(MergeError, match="grid file not found"):
        load_grid(tmp_path / "nope.yml")


# ---------------------------------------------------------------- partition

def test_partition_covers_every_item_once_deterministically():
    costs = [5, 1, 3, 3, 8, 2, 2, 7, 1, 4]
    for n in (1, 2, 3, 4, 12):
        slices = partition(costs, n)
        assert len(slices) == n
        assert sorted(i for s in slices for i in s) == list(range(len(costs)))
        assert slices == partition(list(costs), n)


def test_partition_balanced_for_simple_costs():
    assert partition([1.0] * 6, 3) == [[0, 3], [1, 4], [2, 5]]
    slices = partition([4, 3, 3, 2, 2, 2], 2)
    assert sorted(sum([4, 3, 3, 2, 2, 2][i] for i in s) for s in slices) == [8, 8]
    assert partition([], 2) == [[], []]
    with pytest.raises(ValueError):
        partition([1], 0)
