"""Recipe loading and phase-A validation (docs/recipe.md §1, §2, §4, §5, §6).

The method specs are fixtures mirroring docs/recipe.md §5 so these tests do not depend on the method
modules; a few tests at the end use the real registry when it is populated.
"""

import json
import textwrap

import pytest
import torch

from mergekit_like.errors import MergeError
from mergekit_like.methods.base import REQUIRED, MethodSpec, ParamSpec
from mergekit_like.recipe import load_recipe, load_recipe_text
from mergekit_like.registry import method_table

W = ParamSpec("weight", "float", REQUIRED, per_model=True)
D = ParamSpec("density", "density", 1.0, per_model=True)
D_NOOP = ParamSpec("density", "density", 1.0, per_model=True, effective=False)
I8 = ParamSpec("int8_mask", "bool", False, effective=False)
LAM = ParamSpec("lambda", "float", 1.0)


def norm(default):
    return ParamSpec("normalize", "bool", default)


def resc(default, effective=True):
    return ParamSpec("rescale", "rescale", default, effective=effective)


SPECS = {
    "linear": MethodSpec("linear", (W, norm(True)), needs_base=False, base_joins_inputs=True),
    "slerp": MethodSpec("slerp", (ParamSpec("t", "float", usual=(0.0, 1.0)),), exact_inputs=2),
    "task_arithmetic": MethodSpec("task_arithmetic", (W, D_NOOP, norm(False), LAM,
                                                      resc(False, False), I8)),
    "ties": MethodSpec("ties", (W, D, norm(True), resc(False), LAM, I8,
                                ParamSpec("trim_scope", "choice", "tensor",
                                          choices=("tensor", "model")))),
    "dare_ties": MethodSpec("dare_ties", (W, D, norm(False), resc(True), LAM, I8)),
    "dare_linear": MethodSpec("dare_linear", (W, D, norm(False), resc(True), LAM, I8)),
    **{name: None for name in ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear")},
}  # None: known to the table, not implemented (as registry.method_table() lists them)


@pytest.fixture
def rec(tmp_path, monkeypatch):
    """rec(text, **kw) -> Recipe, loaded from ./recipe.yml so messages say 'recipe.yml:LINE'."""
    monkeypatch.chdir(tmp_path)

    def load(text, **kw):
        (tmp_path / "recipe.yml").write_text(textwrap.dedent(text).lstrip("\n"))
        kw.setdefault("methods", SPECS)
        return load_recipe("recipe.yml", **kw)
    return load


@pytest.fixture
def err(rec):
    """err(text) -> the MergeError message of loading it."""
    def run(text, **kw):
        with pytest.raises(MergeError) as exc:
            rec(text, **kw)
        return str(exc.value)
    return run


TIES_HEAD = """
merge_method: ties
base_model: org/base-8b
models:
"""


# ---------------------------------------------------------------- §6 examples (phase A)

def test_unknown_method_with_suggestion_and_known_list(err):
    msg = err("merge_method: dare-ties\nbase_model: org/b\nmodels: [{model: org/a}]\n")
    assert msg == ("recipe.yml:1 merge_method: unknown method 'dare-ties'; did you mean "
                   "'dare_ties'? (known: linear, slerp, task_arithmetic, ties, dare_ties, "
                   "dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear)")


def test_required_weight_missing(err):
    msg = err(TIES_HEAD + "  - model: org/math-8b\n    parameters:\n      weight: 1.0\n"
                          "  - model: org/code-8b\n    parameters:\n      density: 0.5\n")
    assert msg == ("recipe.yml:7 models[1] (org/code-8b): method 'ties' requires 'weight', but "
                   "neither models[1].parameters nor top-level parameters sets it")


CONDITIONAL = TIES_HEAD + """\
  - model: org/math-8b
    parameters: {weight: 1.0}
  - model: org/code-8b
    parameters:
      density: 0.5
      weight: [{filter: mlp, value: 0.5}, {filter: self_attn, value: 0.3}]
"""


def test_conditional_without_catch_all_errors_per_tensor(rec):
    r = rec(CONDITIONAL)
    code = r.inputs[1]
    assert r.model_param("weight", code, "model.layers.0.mlp.up_proj.weight", 0.0) == 0.5
    assert r.model_param("weight", code, "model.layers.0.self_attn.q_proj.weight", 0.0) == 0.3
    with pytest.raises(MergeError) as exc:
        r.model_param("weight", code, "model.embed_tokens.weight", 0.0)
    assert str(exc.value) == ("recipe.yml:9 models[1] (org/code-8b): 'weight' has no value for "
                              "tensor 'model.embed_tokens.weight' (no filter matched and there "
                              "is no catch-all entry)")


def test_conditional_falls_through_to_top_level(rec):
    r = rec(CONDITIONAL + "parameters: {weight: 0.2, density: [{filter: mlp, value: 0.9}]}\n")
    code, math_ = r.inputs[1], r.inputs[0]
    assert r.model_param("weight", code, "model.embed_tokens.weight", 0.0) == 0.2
    assert r.model_param("weight", code, "model.layers.1.mlp.x", 0.0) == 0.5
    assert r.model_param("weight", math_, "model.embed_tokens.weight", 0.0) == 1.0  # level 1
    assert r.model_param("density", math_, "model.layers.1.mlp.x", 0.0) == 0.9  # level 2
    assert r.model_param("density", math_, "lm_head.weight", 0.0) == 1.0  # level 3: default
    assert r.model_param("density", code, "model.layers.1.mlp.x", 0.0) == 0.5  # level 1


def test_needs_base_model(err):
    msg = err("merge_method: ties\nmodels:\n  - {model: org/a, parameters: {weight: 1}}\n")
    assert msg == ("recipe.yml: merge_method 'ties' needs base_model (the model the task vectors "
                   "are taken against)")


def test_unknown_parameter_with_suggestion(err):
    msg = err(TIES_HEAD + "# a comment\n  - model: org/math-8b\n    parameters:\n"
                          "      weight: 1.0\n      densty: 0.5\n")
    assert msg == ("recipe.yml:8 models[0].parameters.densty: unknown parameter for method "
                   "'ties'; did you mean 'density'? (known: weight, density, normalize, rescale, "
                   "lambda, int8_mask, trim_scope)")


def test_dtype_alias_rejected_and_torch_prefix_accepted(rec, err):
    body = TIES_HEAD + "  - {model: org/a, parameters: {weight: 1.0}}\n" + "#\n" * 9
    msg = err(body + "dtype: bf16\n")
    assert msg == ("recipe.yml:14 dtype: 'bf16' is not a supported dtype; use one of bfloat16, "
                   "float16, float32, float64")
    assert "out_dtype: 'int8' is not a supported dtype" in err(body + "out_dtype: int8\n")
    r = rec(body + "dtype: torch.bfloat16\n")
    assert r.dtype == torch.bfloat16 and r.out_dtype == torch.bfloat16  # out_dtype defaults
    r = rec(body + "dtype: float32\nout_dtype: torch.float16\n")
    assert (r.dtype, r.out_dtype) == (torch.float32, torch.float16)
    assert rec(body).dtype is None and rec(body).out_dtype is None


def test_empty_slice_rejected(err):
    msg = err("merge_method: ties\nbase_model: org/b\n# x\n# y\nslices:\n  - sources: []\n")
    assert msg == "recipe.yml:6 slices[0].sources: a slice needs at least one source"


def test_density_out_of_range(err):
    msg = err(TIES_HEAD + "  - model: org/math-8b\n    parameters:\n      density: 1.5\n"
                          "      weight: 1.0\n")
    assert msg == "recipe.yml:6 models[0].parameters.density: 1.5 is outside [0, 1]"
    msg = err(TIES_HEAD + "  - model: org/m\n    parameters:\n      weight: 1.0\n"
                          "      density: [1.0, 0.5, -0.1]\n")
    assert msg == "recipe.yml:7 models[0].parameters.density[2]: -0.1 is outside [0, 1]"
    msg = err(TIES_HEAD + "  - model: org/m\n    parameters: {weight: 1}\n"
                          "parameters:\n  density:\n    - filter: mlp\n      value: 2\n")
    assert msg == "recipe.yml:9 parameters.density[0].value: 2 is outside [0, 1]"


def test_not_a_folder_nor_repo_id(err):
    msg = err("merge_method: ties\nmodels:\n  - model: ./ckpt/mth\n")
    assert msg.startswith("recipe.yml:3 models[0].model: no model folder at ./ckpt/mth (")
    assert msg.endswith("/ckpt/mth)")


def test_slerp_takes_exactly_two(err, rec):
    head = "merge_method: slerp\nbase_model: org/b\nparameters: {t: 0.5}\nmodels:\n"
    msg = err(head + "  - model: org/x\n  - model: org/y\n")
    assert msg == "recipe.yml: slerp takes exactly 2 models (base included), got 3"
    r = rec(head + "  - model: org/x\n")
    assert [(m.ref.path, m.is_base, m.index) for m in r.inputs] == [("org/x", False, 0),
                                                                     ("org/b", True, 1)]
    r = rec(head + "  - model: org/b\n  - model: org/x\n")  # base listed: still 2
    assert [m.is_base for m in r.inputs] == [True, False]
    assert "slerp' requires 't'" in err("merge_method: slerp\nbase_model: org/b\n"
                                        "models: [{model: org/x}]\n")


# ---------------------------------------------------------------- more phase-A errors

def test_yaml_syntax_error_reports_line(err):
    msg = err("merge_method: ties\nbase_model: org/b\nmodels:\n  - model: [org/a\n"
              "parameters: {weight: 1}\n")
    assert msg.startswith("recipe.yml:5: YAML syntax error")
    assert err("merge_method: ties\nmerge_method: linear\n") == \
        "recipe.yml:2 merge_method: duplicate key 'merge_method' (first at line 1)"


def test_unknown_top_level_key_with_suggestion(err):
    msg = err(TIES_HEAD + "  - {model: org/a, parameters: {weight: 1}}\ndtyp: float32\n")
    assert msg.startswith("recipe.yml:5 dtyp: unknown key; did you mean 'dtype'? (known: "
                          "merge_method, base_model, models, slices, parameters, dtype, out_dtype,")
    msg = err(TIES_HEAD + "  - model: org/a\n    paramters: {weight: 1}\n")
    assert msg == ("recipe.yml:5 models[0].paramters: unknown key; did you mean 'parameters'? "
                   "(known: model, parameters)")
    assert err("base_model: org/b\n") == \
        "recipe.yml: 'merge_method' is required (the merge operator, e.g. ties)"
    assert err("merge_method: ties\nvocab_policy: pad\n") == \
        "recipe.yml:2 vocab_policy: 'pad' is not allowed; use 'common' or 'error'"
    assert "models[0]: expected a map like {model: org/name" in err(
        "merge_method: linear\nmodels: [org/a]\n")


def test_unsupported_features(err, rec):
    base = TIES_HEAD + "  - {model: org/a, parameters: {weight: 1}}\n"
    assert err(base + "modules: {}\n").startswith("recipe.yml:5 modules: per-module recipes")
    assert err(base + "tokenizer: {source: union}\ntokenizer_source: base\n").startswith(
        "recipe.yml:5 tokenizer: set either tokenizer_source or tokenizer, not both")
    assert rec(base + "tokenizer_source: union\n").vocab.mode == "union"
    assert rec(base + "tokenizer: {source: org/a}\n").vocab.donor.path == "org/a"
    assert err(base + "chat_template: 7\n").startswith(
        "recipe.yml:5 chat_template: expected a template name")
    assert "LoRA references ('org/a+org/lora'" in err(
        TIES_HEAD + "  - {model: org/a+org/lora, parameters: {weight: 1}}\n")
    assert err(TIES_HEAD + "  - model:\n      model: {path: org/a}\n      lora: {path: org/l}\n"
               ).startswith("recipe.yml:6 models[0].model.lora: LoRA adapters are not supported")


def test_not_supported_yet(err):
    msg = err("merge_method: della\nbase_model: org/b\nmodels: [{model: org/a}]\n")
    assert msg.startswith("recipe.yml:1 merge_method 'della' is not supported yet (supported: "
                          "linear, slerp, task_arithmetic, ties")


def test_duplicate_models(err, tmp_path):
    msg = err(TIES_HEAD + "  - {model: org/a, parameters: {weight: 1}}\n"
                          "  - {model: org/a, parameters: {weight: 2}}\n")
    assert msg == ("recipe.yml:5 models[1].model: 'org/a' is listed twice (also models[0]); "
                   "duplicate models are not allowed")
    (tmp_path / "ck").mkdir()
    assert "listed twice" in err(TIES_HEAD + "  - {model: ./ck, parameters: {weight: 1}}\n"
                                             "  - {model: ck, parameters: {weight: 2}}\n")
    # the same repo at two revisions is fine
    two = TIES_HEAD + "  - {model: org/a@v1, parameters: {weight: 1}}\n" \
                      "  - {model: org/a@v2, parameters: {weight: 2}}\n"
    assert len(load_recipe_text(two, methods=SPECS).inputs) == 3
    with pytest.raises(MergeError, match="listed twice"):
        load_recipe_text(two.replace("@v2", "@v1"), methods=SPECS)


def test_model_references(err, rec, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "odd@name").mkdir()
    entry = "  - {model: %s, parameters: {weight: 1}}\n"
    assert err(TIES_HEAD + entry % "./ckpt@v2") == (
        "recipe.yml:4 models[0].model: './ckpt@v2': local folder './ckpt' cannot take a revision "
        "('@v2'); revisions are for Hub repos")
    assert err(TIES_HEAD + entry % "org/a@v1@v2") == (
        "recipe.yml:4 models[0].model: 'org/a@v1@v2' has more than one '@'; write repo@revision")
    assert "empty revision" in err(TIES_HEAD + entry % "org/a@")
    assert "'org/a/b' is neither" in err(TIES_HEAD + entry % "org/a/b")
    r = rec(TIES_HEAD + entry % "./odd@name" + entry % "gpt2" + entry % "./ckpt"
            + entry % ("org/x@" + "a" * 40))
    refs = [m.ref for m in r.inputs]
    assert (refs[0].path, refs[0].revision, refs[0].is_local) == ("./odd@name", None, True)
    assert (refs[1].path, refs[1].revision, refs[1].is_local) == ("gpt2", None, False)
    assert refs[2].is_local and refs[3].revision == "a" * 40
    assert r.base.path == "org/base-8b" and r.inputs[-1].is_base and r.inputs[-1].index == 4
    # dict form, override_architecture ignored with a warning
    r = rec(TIES_HEAD + "  - model:\n      model: {path: org/a, revision: main}\n"
                        "      override_architecture: MistralForCausalLM\n"
                        "    parameters: {weight: 1}\n")
    assert (r.inputs[0].ref.path, r.inputs[0].ref.revision) == ("org/a", "main")
    assert r.inputs[0].ref.display == "org/a@main"
    assert any("models[0].model.override_architecture: ignored" in w for w in r.warnings)
    assert "cannot take a revision" in err(
        TIES_HEAD + "  - model: {model: {path: ./ckpt, revision: v1}}\n")


def test_value_kinds(err, rec):
    m = TIES_HEAD + "  - {model: org/a, parameters: {weight: 1}}\nparameters:\n"
    assert err(m + "  normalize: [true, false]\n") == (
        "recipe.yml:6 parameters.normalize: 'normalize' must be true or false; gradients are not "
        "allowed for bools")
    assert err(m + "  normalize: 1\n") == \
        "recipe.yml:6 parameters.normalize: 'normalize' must be true or false, got 1"
    assert err(m + "  rescale: l2\n") == \
        "recipe.yml:6 parameters.rescale: 'rescale' must be true, false or \"l1\", got 'l2'"
    assert err(m + "  trim_scope: modle\n") == ("recipe.yml:6 parameters.trim_scope: 'trim_scope' "
                                                "must be one of tensor, model; got 'modle'; did "
                                                "you mean 'model'?")
    assert err(m + "  lambda: .inf\n") == "recipe.yml:6 parameters.lambda: inf is not a finite number"
    assert rec(m + "  lambda: 1e6\n").method_param("lambda", "x", 0.0) == 1e6  # as mergekit
    assert err(m + "  weight: true\n") == "recipe.yml:6 parameters.weight: expected a number, got true"
    assert err(m + "  weight: [0.1, x]\n") == \
        "recipe.yml:6 parameters.weight[1]: expected a number, got 'x'"
    assert err(m + "  lambda: {filter: mlp, value: oops}\n") == \
        "recipe.yml:6 parameters.lambda.value: expected a number, got 'oops'"
    r = rec(m + "  rescale: l1\n  normalize: [{filter: mlp, value: false}, {value: true}]\n"
                "  weight: -0.5\n")
    assert r.method_param("rescale", "x", 0) == "l1"
    assert r.method_param("normalize", "a.mlp.b", 0) is False
    assert r.model_param("weight", r.inputs[0], "x", 0) == 1.0  # level 1 beats level 2
    # ints are normalised to floats
    assert type(r.model_param("weight", r.inputs[0], "x", 0)) is float


def test_trim_scope_model_needs_scalar_density(err, rec):
    m = TIES_HEAD + "  - {model: org/a, parameters: {weight: 1, density: %s}}\n" \
                    "parameters: {trim_scope: model}\n"
    assert err(m % "[0.5, 0.2]") == ("recipe.yml:4 models[0].parameters.density: with "
                                     "trim_scope: model, density must be a plain number per model "
                                     "(no gradient, no filter)")
    assert rec(m % "0.3").method_param("trim_scope", "x", 0) == "model"


def test_t_outside_range_warns(rec):
    r = rec("merge_method: slerp\nbase_model: org/b\nmodels: [{model: org/x}]\n"
            "parameters:\n  t: [0, 0.5, 1.2]\n")
    assert r.warnings == ["recipe.yml:5 parameters.t[2]: 1.2 is outside [0, 1] (extrapolation)"]
    assert r.method_param("t", "model.layers.1.x", 0.5) == 0.5


def test_method_wide_param_under_models_warns_and_is_ignored(rec):
    r = rec(TIES_HEAD + "  - model: org/a\n    parameters: {weight: 1}\n"
                        "  - model: org/c\n    parameters:\n      weight: 1\n"
                        "      normalize: false\n")
    assert ("recipe.yml:9 models[1].parameters.normalize: 'normalize' is method-wide; the value "
            "under models[1].parameters is ignored; put it under top-level parameters") in r.warnings
    assert r.method_param("normalize", "x", 0.0) is True  # ties default, not the ignored false
    assert "normalize" not in r.inputs[1].entry_params


def test_ineffective_param_warned_once(rec):
    r = rec("merge_method: task_arithmetic\nbase_model: org/b\nmodels:\n"
            "  - {model: org/a, parameters: {weight: 1, density: 0.5}}\n"
            "  - {model: org/c, parameters: {weight: 1, density: 0.4}}\n")
    noop = [w for w in r.warnings if "has no effect" in w]
    assert noop == ["recipe.yml:4 models[0].parameters.density: 'density' has no effect for "
                    "merge_method 'task_arithmetic' (accepted for mergekit compatibility)"]


def test_base_listed_with_params_for_task_vector_method(rec):
    r = rec(TIES_HEAD + "  - {model: org/base-8b, parameters: {density: 0.5}}\n"
                        "  - {model: org/a, parameters: {weight: 1}}\n")
    assert [m.is_base for m in r.inputs] == [True, False] and len(r.inputs) == 2
    assert r.model_param("weight", r.inputs[0], "x", 0) is None
    assert r.model_params(r.inputs[0], "x", 0) == {"weight": None, "density": None}
    assert any("models[0].parameters: density ignored" in w for w in r.warnings)


def test_linear_appended_base_joins_inputs(rec, err):
    head = "merge_method: linear\nbase_model: org/b\nmodels:\n  - {model: org/a, parameters: {weight: 1}}\n"
    msg = err(head)
    assert msg.startswith("recipe.yml:2 base_model (org/b): method 'linear' requires 'weight'")
    r = rec(head + "parameters: {weight: 0.5}\n")
    assert [(m.ref.path, m.index, m.is_base) for m in r.inputs] == [("org/a", 0, False),
                                                                   ("org/b", 1, True)]
    assert r.model_param("weight", r.inputs[1], "x", 0) == 0.5
    assert r.model_param("weight", r.inputs[0], "x", 0) == 1.0
    r = rec("merge_method: linear\nmodels:\n  - {model: org/a, parameters: {weight: 1}}\n")
    assert r.base is None and len(r.inputs) == 1 and r.reference.path == "org/a"
    assert "needs at least 1 model besides base_model, got 0" in err(
        TIES_HEAD.replace("models:\n", "models: []\n"))


def test_seed_and_extensions(rec, err):
    body = TIES_HEAD + "  - {model: org/a, parameters: {weight: 1}}\n"
    r = rec(body)
    assert (r.seed, r.vocab_policy, r.on_missing_tensor, r.on_extra_tensor) == \
        (0, "common", "error", "error")
    assert r.tokenizer_source is None
    r = rec(body + "seed: 7\nvocab_policy: error\non_missing_tensor: skip\non_extra_tensor: ignore\n"
                   "tokenizer_source: org/a\n")
    assert (r.seed, r.vocab_policy, r.on_missing_tensor, r.on_extra_tensor) == \
        (7, "error", "skip", "ignore")
    assert r.tokenizer_source.path == "org/a"
    assert rec(body + "seed: 7\n", seed=3).seed == 3
    assert err(body + "seed: -1\n") == "recipe.yml:5 seed: must be a non-negative integer, got -1"
    assert err(body + "seed: 1.5\n") == "recipe.yml:5 seed: expected an integer, got 1.5"


def test_where_and_text(rec):
    text = CONDITIONAL + "parameters: {weight: 0.2}\n"
    r = rec(text)
    assert r.text == textwrap.dedent(text).lstrip("\n")
    assert r.where("models", 1, "parameters", "weight") == "recipe.yml:9 models[1].parameters.weight"
    assert r.where("models", 1) == "recipe.yml:6 models[1]"
    assert r.where("parameters", "weight") == "recipe.yml:10 parameters.weight"
    assert r.where("parameters", "lambda") == "recipe.yml:10 parameters.lambda"  # deepest known
    assert r.where() == "recipe.yml:"


def test_resolved_fills_defaults_and_hashes_canonically(rec):
    a = rec(TIES_HEAD + "  - {model: org/a, parameters: {weight: 1}}\n")
    b = rec(TIES_HEAD + "  - model: org/a\n    parameters:\n      weight: 1.0\n"
                        "parameters: {normalize: true, lambda: 1}\nseed: 0\n")
    ra = a.resolved()
    assert ra == b.resolved() and a.resolved_hash() == b.resolved_hash()
    assert ra["parameters"] == {"normalize": True, "rescale": False, "lambda": 1.0,
                                "int8_mask": False, "trim_scope": "tensor"}
    assert ra["models"][0]["parameters"] == {"weight": 1.0, "density": 1.0}
    assert ra["models"][1]["is_base"] and ra["models"][1]["parameters"] == {}
    json.dumps(ra)
    c = rec(TIES_HEAD + "  - {model: org/a, parameters: {weight: 1, density: 0.5}}\n")
    assert c.resolved_hash() != a.resolved_hash()
    h = a.resolved_hash()
    a.inputs[0].ref.sha = "f" * 40  # pinned by phase B
    assert a.resolved()["models"][0]["model"]["revision"] == "f" * 40 and a.resolved_hash() != h


def test_refs_are_shared_objects(rec):
    r = rec(TIES_HEAD + "  - {model: org/base-8b}\n  - {model: org/a, parameters: {weight: 1}}\n"
                        "tokenizer_source: org/a\n")
    assert r.base is r.inputs[0].ref and r.tokenizer_source is r.inputs[1].ref
    assert r.all_refs() == [r.inputs[0].ref, r.inputs[1].ref]
    r.base.sha = "b" * 40
    assert r.resolved()["base_model"]["revision"] == "b" * 40


def test_method_param_conditional_without_catch_all(rec):
    r = rec("merge_method: slerp\nbase_model: org/b\nmodels: [{model: org/x}]\nparameters:\n"
            "  t: [{filter: mlp, value: 0.3}]\n")
    assert r.method_param("t", "a.mlp.b", 0.0) == 0.3
    with pytest.raises(MergeError) as exc:
        r.method_param("t", "lm_head.weight", 0.0)
    assert str(exc.value) == ("recipe.yml:5 parameters.t: 't' has no value for tensor "
                              "'lm_head.weight' (no filter matched and there is no catch-all "
                              "entry)")


def test_multiple_documents_rejected(err):
    assert err("merge_method: ties\n---\nmerge_method: linear\n") == (
        "recipe.yml:2: YAML syntax error: the recipe must be a single YAML document "
        "(found a second one)")


FULL_MERGEKIT = """
# a typical mergekit TIES recipe
models:
  - model: mistralai/Mistral-7B-v0.1
    # no parameters necessary for base model
  - model: OpenPipe/mistral-ft-optimized-1218
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: mlabonne/NeuralHermes-2.5-Mistral-7B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: Intel/neural-chat-7b-v3-3
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def test_full_mergekit_example_loads(rec):
    r = rec(FULL_MERGEKIT)
    assert r.merge_method == "ties" and r.dtype == torch.float16 and r.out_dtype == torch.float16
    assert [m.is_base for m in r.inputs] == [True, False, False, False]
    assert r.base.path == "mistralai/Mistral-7B-v0.1"
    ft, hermes, intel = r.inputs[1:]
    assert r.model_param("density", ft, "model.layers.16.mlp.up_proj.weight", 0.5) == 0.7
    assert r.model_param("weight", hermes, "model.embed_tokens.weight", 0.0) == 0.0
    assert r.model_param("weight", intel, "model.layers.3.mlp.gate_proj.weight", 0.1) == 0.5
    assert r.model_param("weight", intel, "model.layers.3.self_attn.o_proj.weight", 0.1) == 0.0
    assert r.method_param("lambda", "x", 0) == 1.0
    assert any("'int8_mask' has no effect" in w for w in r.warnings)


def test_spec_header_example_loads(rec, tmp_path):
    (tmp_path / "checkpoints" / "code-8b").mkdir(parents=True)
    r = rec("""
        merge_method: ties
        base_model: meta-llama/Llama-3.1-8B@a1b2c3d        # repo@revision
        models:
          - model: org/math-8b
            parameters: {weight: 1.0, density: [1.0, 0.7, 0.1]}   # gradient over layers
          - model: ./checkpoints/code-8b                    # local folder
            parameters:
              weight: [{filter: mlp, value: 0.5}, {value: 0.3}]    # conditional
              density: 0.5
        parameters: {normalize: true, lambda: 1.0}
        dtype: float32
        out_dtype: bfloat16
        tokenizer_source: base
        seed: 0
    """)
    assert (r.base.path, r.base.revision) == ("meta-llama/Llama-3.1-8B", "a1b2c3d")
    assert r.inputs[1].ref.is_local and r.tokenizer_source is None and r.warnings == []
    assert r.model_param("density", r.inputs[0], "model.layers.1.mlp.x", 0.25) == 0.85


# ---------------------------------------------------------------- the real registry

def _real(name):
    from mergekit_like.registry import get_method
    method = get_method(name)
    if method is None:
        pytest.skip(f"method '{name}' is not registered yet")
    return method


def test_real_registry_ties(rec):
    _real("ties")
    r = rec(FULL_MERGEKIT, methods=method_table())
    assert r.method_param("normalize", "x", 0) is True
    assert r.model_param("density", r.inputs[1], "lm_head.weight", 0.0) == 1.0
    for p, v in {"lambda": 1.0, "rescale": False, "trim_scope": "tensor"}.items():
        assert r.method_param(p, "x", 0.0) == v


def test_real_registry_unknown_method(err):
    _real("dare_ties")
    msg = err("merge_method: dare-ties\nbase_model: org/b\nmodels: [{model: org/a}]\n",
              methods=method_table())
    assert msg.startswith("recipe.yml:1 merge_method: unknown method 'dare-ties'; did you mean "
                          "'dare_ties'? (known: ")
    assert "della" in msg and "wemoe" in msg
