"""Hostile or mistyped recipes: files that are not recipes, alias bombs, local paths that look
like Hub ids, Hub errors without a recipe line, and numbers YAML 1.1 reads as strings."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from mergekit_like.demo import LlamaShape, make_family
from mergekit_like.errors import MergeError
from mergekit_like.methods.base import REQUIRED, MethodSpec, ParamSpec
from mergekit_like.recipe import Gradient, load_recipe
from mergekit_like.registry import load_recipe as load_with_registry
from support.helpers import expect_merge_error, folder_digest, run_cli, write_recipe
from support.helpers import folder_files

SHAPE = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)


def one_error(code: int, err: str, want_code: int = 2) -> str:
    lines = err.strip().splitlines()
    assert code == want_code and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- item 6: the recipe file

def test_dev_zero_is_not_read(tmp_path, capsys):
    code, _, err = run_cli(["merge", "/dev/zero", tmp_path / "out", "-q"], capsys)
    line = one_error(code, err)
    assert "/dev/zero: not a regular file" in line and "recipe" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_is_refused_without_blocking(tmp_path, capsys):
    fifo = tmp_path / "recipe.yml"
    os.mkfifo(fifo)

    def feed():  # so a reader that opens the FIFO gets a recipe instead of hanging
        try:
            with open(fifo, "w") as fh:
                fh.write("merge_method: linear\n")
        except OSError:
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        code, _, err = run_cli(["merge", fifo, tmp_path / "out", "-q"], capsys)
    finally:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets the feeder finish
        feeder.join(5)
        os.close(fd)
    assert "recipe.yml: not a regular file" in one_error(code, err)


def test_oversized_recipe_is_refused(tmp_path, capsys):
    text = "merge_method: linear\n" + "# padding\n" * 500_000  # 5 MB of comments
    line = expect_merge_error(tmp_path, capsys, text, "recipe.yml: too large for a recipe file",
                              "the limit is 1 MiB")
    assert str(len(text)) in line


def _bomb(anchor_value: str, ref: str) -> str:
    """10 lines: 9 anchors, each 9 copies of the one before (9**8 values once expanded)."""
    lines = ["merge_method: linear", f"a0: &a0 {anchor_value}"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} " + ref.format(", ".join([f"*a{i - 1}"] * 9)))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text", [_bomb("[x, x, x, x, x, x, x, x, x]", "[{}]"),
                                  _bomb("{k: 1}", "{{<<: [{}]}}")], ids=["lists", "merge-keys"])
def test_alias_bomb_is_refused_at_once(tmp_path, capsys, text):
    assert len(text.splitlines()) == 10
    start = time.perf_counter()
    expect_merge_error(tmp_path, capsys, text, "recipe.yml:", "once aliases are expanded")
    assert time.perf_counter() - start < 1.0


def test_deep_nesting_is_one_line(tmp_path, capsys):
    expect_merge_error(tmp_path, capsys, "merge_method: linear\nx: " + "[" * 3000 + "]" * 3000,
                       "recipe.yml: YAML nesting is too deep")


# ---------------------------------------------------------------- item 7: local paths

@pytest.fixture
def demo(tmp_path, monkeypatch):
    """demo_models/{base,ft1,ft2} under the current folder (tmp_path)."""
    monkeypatch.chdir(tmp_path)
    make_family(tmp_path / "demo_models", SHAPE, n_finetunes=2)
    return tmp_path / "demo_models"


def ties_text(base: str, ft1: str, ft2: str, w1: str = "1.0", d2: str = "0.7") -> str:
    """A ties recipe: models[0] on line 3, models[1] on line 5, base_model on line 7."""
    return (f"merge_method: ties\nmodels:\n  - model: {ft1}\n    parameters: {{weight: {w1}, "
            f"density: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: {d2}}}\n"
            f"base_model: {base}\ndtype: float32\n")


def test_typo_under_an_existing_folder_is_local(demo, tmp_path, capsys):
    text = ties_text("demo_models/base", "demo_models/ft1", "demo_models/ft4")
    expect_merge_error(tmp_path, capsys, text, "recipe.yml:5 models[1].model: ",
                       "no model folder at demo_models/ft4",
                       str(tmp_path / "demo_models" / "ft4"),
                       "'demo_models' exists here")


@pytest.mark.parametrize("ref", ["./missing", "../missing", "ABS"])
def test_path_prefixes_are_local(demo, tmp_path, capsys, ref):
    ref = str(tmp_path / "missing") if ref == "ABS" else ref
    text = ties_text("demo_models/base", ref, "demo_models/ft2")
    expect_merge_error(tmp_path, capsys, text, "recipe.yml:3 models[0].model: ",
                       f"no model folder at {ref}")


def test_home_is_expanded(demo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = write_recipe(tmp_path / "ok.yml", ties_text("~/demo_models/base", "~/demo_models/ft1",
                                                       "demo_models/ft2"))
    r = load_with_registry(path)
    assert r.inputs[0].ref.is_local and r.inputs[0].ref.path == str(demo / "ft1")
    assert r.base.display == "~/demo_models/base" and r.base.path == str(demo / "base")
    text = ties_text("demo_models/base", "~/nope", "demo_models/ft2")
    expect_merge_error(tmp_path, capsys, text, "recipe.yml:3 models[0].model: ",
                       f"no model folder at ~/nope ({tmp_path / 'nope'})")


# ---------------------------------------------------------------- item 7: Hub errors

@pytest.fixture
def hub(fake_hub, tmp_path):
    for folder in make_family(tmp_path / "fam", SHAPE, n_finetunes=2):
        fake_hub.add_repo(f"org/{folder.name}", folder_files(folder))
    (tmp_path / "cache").mkdir()
    return fake_hub


@pytest.mark.parametrize("where,refs", [
    ("recipe.yml:5 models[1]: ", ("org/base", "org/ft1", "org/nope")),
    ("recipe.yml:7 base_model: ", ("org/nope", "org/ft1", "org/ft2")),
])
def test_hub_error_names_the_recipe_line(hub, tmp_path, capsys, where, refs):
    expect_merge_error(tmp_path, capsys, ties_text(*refs), where + "org/nope not found on",
                       extra=("--endpoint", hub.url, "--cache-dir", tmp_path / "cache"))


def test_unreachable_hub_names_model_and_line(fake_hub, tmp_path, capsys):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    path = write_recipe(tmp_path / "recipe.yml", ties_text("org/base", "org/ft1", "org/ft2"))
    code, _, err = run_cli(["merge", path, tmp_path / "out", "--endpoint", url, "--cache-dir",
                            tmp_path / "c", "-q"], capsys)
    line = one_error(code, err, want_code=1)
    assert f"recipe.yml:3 models[0] (org/ft1): cannot reach {url}" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- item 8: numeric strings

SPECS = {"toy": MethodSpec("toy", (
    ParamSpec("weight", "float", REQUIRED, per_model=True),
    ParamSpec("penalty_lambda", "penalty", 1000.0),
    ParamSpec("density", "density", 1.0),
    ParamSpec("rank", "rank", 1.0),
    ParamSpec("hidden", "int", 8)), needs_base=False, base_joins_inputs=True)}


def toy(tmp_path, params: str, weight: str = "1.0"):
    text = (f"merge_method: toy\nmodels:\n  - model: org/a\n    parameters: {{weight: {weight}}}\n"
            f"parameters:\n{params}")
    return load_recipe(write_recipe(tmp_path / "recipe.yml", text), methods=SPECS)


@pytest.mark.parametrize("written,name,value", [
    ("penalty_lambda: 1e6", "penalty_lambda", 1e6),
    ("penalty_lambda: '1e6'", "penalty_lambda", 1e6),
    ("penalty_lambda: inf", "penalty_lambda", float("inf")),
    ('density: "5e-1"', "density", 0.5),
    ("density: .5e0", "density", 0.5),
    ("rank: 5e-1", "rank", 0.5),
    ("hidden: '16'", "hidden", 16),
    ("hidden: '+16.0'", "hidden", 16),
])
def test_numeric_strings_are_numbers(tmp_path, written, name, value):
    r = toy(tmp_path, f"  {written}\n")
    got = r.method_param(name, "x", 0.0)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("weight,value", [("1e-1", 0.1), ("'-2.5E-3'", -0.0025),
                                          ("-25E-4", -0.0025), ("'+3'", 3.0)])
def test_numeric_string_weight(tmp_path, weight, value):
    r = toy(tmp_path, "  density: 1.0\n", weight)
    got = r.model_param("weight", r.inputs[0], "x", 0.0)
    assert got == value and isinstance(got, float)


def test_numeric_string_gradient(tmp_path):
    r = toy(tmp_path, "  density: [1e-3, 5e-1]\n  penalty_lambda: [{filter: mlp, value: "
                      "[1e3, 1e6]}, {value: 0}]\n")
    assert r.top_params["density"] == Gradient((0.001, 0.5))
    assert r.method_param("density", "x", 1.0) == 0.5
    assert r.method_param("penalty_lambda", "a.mlp.b", 1.0) == 1e6


@pytest.mark.parametrize("written,needle", [
    ("  density: [0.1, 1e-1, x]\n",
     "recipe.yml:6 parameters.density[2]: expected a number, got 'x'"),
    ("  density: 5e0\n", "recipe.yml:6 parameters.density: 5.0 is outside [0, 1]"),
])
def test_non_numbers_still_refused(tmp_path, written, needle):
    with pytest.raises(MergeError) as exc:
        toy(tmp_path, written)
    assert str(exc.value) == needle.replace("recipe.yml", str(tmp_path / "recipe.yml"))


def test_merge_with_numeric_strings_matches_floats(tmp_path, capsys):
    fam = tmp_path / "fam"
    make_family(fam, SHAPE, n_finetunes=2)
    outs = []
    for i, (w1, d2) in enumerate([("1e-1", '"7e-1"'), ("0.1", "0.7")]):
        recipe = write_recipe(tmp_path / f"r{i}.yml", ties_text(
            str(fam / "base"), str(fam / "ft1"), str(fam / "ft2"), w1, d2))
        code, _, err = run_cli(["merge", recipe, tmp_path / f"out{i}", "-q"], capsys)
        assert code == 0, err
        outs.append({k: v for k, v in folder_digest(tmp_path / f"out{i}").items()
                     if k.endswith(".safetensors")})
    assert outs[0] == outs[1] and outs[0]
