"""merge_method: twin — the bundle the merge writes (docs/methods/twin.md §2, §5, §9)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from support.helpers import load_folder, run_cli, write_recipe
from support.twin_fixture import hand_bundle, rank_for, tiny_family

from mergekit_like.twin.bundle import TwinBundle
from mergekit_like.registry import verify as verify_output

TASKS = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return tiny_family(tmp_path_factory.mktemp("twin-family"), n_tasks=3)


def twin_doc(family, *, tasks=TASKS, out_dtype="float32", **params):
    params.setdefault("svd", "exact")
    return {"merge_method": "twin", "base_model": str(family[0]),
            "models": [{"model": str(f), "name": t} for f, t in zip(family[1:], tasks)],
            "parameters": params, "dtype": "float32", "out_dtype": out_dtype}


def merge(tmp_path, capsys, doc, name="bundle", extra=()):
    recipe = write_recipe(tmp_path / f"{name}.yml", doc)
    out = tmp_path / name
    code, _, err = run_cli(["merge", recipe, out, "-q", *extra], capsys)
    return code, out, err


def test_bundle_matches_the_equations(family, tmp_path, capsys):
    code, out, err = merge(tmp_path, capsys, twin_doc(family, rank=0.5))
    assert code == 0, err
    ref = hand_bundle(tmp_path / "hand", family, TASKS, rank=0.5, lam=0.3)
    shared, expected = load_folder(out), load_folder(ref)
    assert shared.keys() == expected.keys()
    for name in shared:
        torch.testing.assert_close(shared[name], expected[name], rtol=0, atol=1e-7)
    info = json.loads((out / "twin" / "twin.json").read_text())
    hand = json.loads((ref / "twin" / "twin.json").read_text())
    assert info["tasks"] == TASKS and info["format_version"] == 1
    with TwinBundle(out) as got, TwinBundle(ref) as want:
        lowrank = [n for n, e in got.entries.items() if e.kind == "lowrank"]
        assert lowrank == [n for n, e in want.entries.items() if e.kind == "lowrank"]
        assert len(lowrank) == 2 * 7                            # 7 block matrices per layer
        for name in lowrank:
            assert got.entries[name].rank == want.entries[name].rank
            for task in TASKS:
                a, b = got.exclusive(task, name)
                a0, b0 = want.exclusive(task, name)
                torch.testing.assert_close(a @ b, a0 @ b0, rtol=1e-5, atol=1e-6)
                assert info["tensors"][name]["energy"][task] == pytest.approx(
                    hand["tensors"][name]["energy"][task], rel=1e-5)
    assert verify_output(out).extra[0]["tasks"] == TASKS


def test_shared_model_is_the_task_arithmetic_merge_bit_for_bit(family, tmp_path, capsys):
    code, out, err = merge(tmp_path, capsys, twin_doc(family, rank=0.25))
    assert code == 0, err
    ta = {"merge_method": "task_arithmetic", "base_model": str(family[0]),
          "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in family[1:]],
          "parameters": {"lambda": 0.3}, "dtype": "float32", "out_dtype": "float32"}
    code, ta_out, err = merge(tmp_path, capsys, ta, name="ta")
    assert code == 0, err
    shared, plain = load_folder(out), load_folder(ta_out)
    assert all(torch.equal(shared[n], plain[n]) for n in plain)


def test_shared_ties_is_the_ties_merge(family, tmp_path, capsys):
    shared = {"merge_method": "ties", "parameters": {"lambda": 0.5}}
    doc = twin_doc(family, rank=0.25, shared=shared)
    for entry in doc["models"]:
        entry["parameters"] = {"density": 0.4}
    code, out, err = merge(tmp_path, capsys, doc)
    assert code == 0, err
    ties = {"merge_method": "ties", "base_model": str(family[0]),
            "models": [{"model": str(f), "parameters": {"weight": 1.0, "density": 0.4}}
                       for f in family[1:]],
            "parameters": {"lambda": 0.5}, "dtype": "float32", "out_dtype": "float32"}
    code, ties_out, err = merge(tmp_path, capsys, ties, name="ties")
    assert code == 0, err
    got, want = load_folder(out), load_folder(ties_out)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_full_rank_materialize_reproduces_each_fine_tune(family, tmp_path, capsys):
    code, out, err = merge(tmp_path, capsys, twin_doc(family, rank="full", dense_small=True))
    assert code == 0, err
    for task, folder in zip(TASKS, family[1:]):
        mat = tmp_path / f"mat-{task}"
        code, _, err = run_cli(["twin", "materialize", out, mat, "--task", task, "-q"], capsys)
        assert code == 0, err
        got, want, shared = load_folder(mat), load_folder(folder), load_folder(out)
        with TwinBundle(out) as bundle:
            for name, entry in bundle.entries.items():
                if entry.kind == "shared_only":
                    assert torch.equal(got[name], shared[name])
                else:
                    assert not torch.equal(got[name], shared[name])
                    torch.testing.assert_close(got[name], want[name], rtol=0, atol=2e-6)


def test_bundle_bytes_match_the_storage_formula(family, tmp_path, capsys):
    """Factor bytes = T·Σ r·(m + n)·b_f over the block matrices (bf16: b_f = 2)."""
    code, out, err = merge(tmp_path, capsys, twin_doc(family, rank=0.25, out_dtype="bfloat16"))
    assert code == 0, err
    report = verify_output(out)
    shared = load_folder(out)
    per_task = sum(rank_for(0.25, tuple(t.shape)) * sum(t.shape) * 2
                   for n, t in shared.items() if ".layers." in n and t.ndim == 2)
    assert report.extra[0]["factor_bytes"] == {t: per_task for t in TASKS}
    on_disk = sum(p.stat().st_size for p in (out / "twin").rglob("exclusive*.safetensors"))
    assert 3 * per_task < on_disk < 3 * per_task + 3 * 16_000      # + the headers
    info = json.loads((out / "twin" / "twin.json").read_text())
    assert {t: s["bytes"] for t, s in info["summary"].items()} == {t: per_task for t in TASKS}


def test_rank_by_filter_and_absolute_rank_clamped(family, tmp_path, capsys):
    doc = twin_doc(family, rank=[{"filter": "mlp", "value": 40}, {"value": 0.25}])
    code, out, err = merge(tmp_path, capsys, doc)
    assert code == 0, err
    assert "clamped" in err
    with TwinBundle(out) as bundle:
        for name, e in bundle.entries.items():
            if e.kind != "lowrank":
                continue
            full = min(e.shape)
            assert e.rank == (min(40, full) if ".mlp." in name else max(1, math.floor(full / 4)))


def test_lowrank_svd_is_reproducible_and_near_exact(family, tmp_path, capsys):
    energies = []
    for name in ("r1", "r2"):
        code, out, err = merge(tmp_path, capsys, twin_doc(family, rank=0.25, svd="lowrank"),
                               name=name)
        assert code == 0, err
        energies.append(json.loads((out / "twin" / "twin.json").read_text())["tensors"])
    assert (tmp_path / "r1" / "twin" / "alpha" / "exclusive.safetensors").read_bytes() == \
        (tmp_path / "r2" / "twin" / "alpha" / "exclusive.safetensors").read_bytes()
    code, out, err = merge(tmp_path, capsys, twin_doc(family, rank=0.25), name="exact")
    exact = json.loads((out / "twin" / "twin.json").read_text())["tensors"]
    for name, e in exact.items():
        if e["kind"] == "lowrank":
            assert energies[0][name]["svd"] == "lowrank"
            for t in TASKS:
                assert energies[0][name]["energy"][t] <= e["energy"][t] + 1e-6
                assert energies[0][name]["energy"][t] > 0.9 * e["energy"][t]


def test_svd_failure_falls_back_and_is_recorded(family, tmp_path, capsys, monkeypatch):
    real = torch.linalg.svd

    def flaky(a, *args, **kw):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("injected: failed to converge")
        return real(a, *args, **kw)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    code, out, err = merge(tmp_path, capsys, twin_doc(family, rank=0.25))
    assert code == 0, err
    info = json.loads((out / "twin" / "twin.json").read_text())
    kinds = {e["svd"] for e in info["tensors"].values() if e["kind"] == "lowrank"}
    assert kinds == {"exact-float64-cpu"}


def test_interrupted_bundle_resumes_to_the_same_bytes(family, tmp_path, capsys, monkeypatch):
    from mergekit_like.engine import run as engine

    doc = twin_doc(family, rank=0.25)
    code, fresh, err = merge(tmp_path, capsys, doc, name="fresh", extra=["--out-shard-size", "20KB"])
    assert code == 0, err
    real, calls = engine.merge_job, []

    def interrupt(*args, **kw):
        calls.append(1)
        if len(calls) == 12:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(engine, "merge_job", interrupt)
    code, out, _ = merge(tmp_path, capsys, doc, name="again", extra=["--out-shard-size", "20KB"])
    assert code == 130 and not out.exists()
    assert any((tmp_path / ".again.partial" / ".mergekit_like_state" / "done").iterdir())
    monkeypatch.setattr(engine, "merge_job", real)
    code, out, err = merge(tmp_path, capsys, doc, name="again", extra=["--out-shard-size", "20KB"])
    assert code == 0, err
    for path in sorted(fresh.rglob("*.safetensors")):
        assert path.read_bytes() == (out / path.relative_to(fresh)).read_bytes(), path
    assert json.loads((out / "twin" / "twin.json").read_text())["tensors"] == \
        json.loads((fresh / "twin" / "twin.json").read_text())["tensors"]


@pytest.mark.parametrize("change, message", [
    (lambda d: d["models"][1].pop("name"), "needs a task 'name'"),
    (lambda d: d["models"][1].update(name="alpha"), "used twice"),
    (lambda d: d["models"][1].update(name="bad name"), "must match"),
    (lambda d: d["parameters"].update(rank=0), "absolute rank must be at least 1"),
    (lambda d: d["parameters"].update(rank=1.5), "(0, 1]"),
    (lambda d: d["parameters"].update(rank=[0.2, 8]), "fractions only"),
    (lambda d: d["parameters"].update(shared={"merge_method": "linear"}), "not 'linear'"),
    (lambda d: d["parameters"].update(shared={"merge_method": "task_arithmetic",
                                              "parameters": {"lamda": 0.3}}), "lambda"),
    (lambda d: d["parameters"].update(shared={"method": "ties"}), "unknown key in 'shared'"),
    (lambda d: d["models"][0].update(parameters={"density": 0.5}), "has no effect"),
    (lambda d: d.pop("base_model"), "needs base_model"),
    (lambda d: d.update(models=d["models"][:1]), "at least 2"),
    (lambda d: d["parameters"].update(svd="fast"), "auto, exact, lowrank"),
])
def test_bad_recipes_fail_up_front(family, tmp_path, capsys, change, message):
    doc = twin_doc(family, rank=0.25)
    change(doc)
    code, out, err = merge(tmp_path, capsys, doc)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not out.exists() and not (tmp_path / ".bundle.partial").exists()


def test_rank_one_int_warns(family, tmp_path, capsys):
    code, out, err = merge(tmp_path, capsys, twin_doc(family, rank=1))
    assert code == 0, err
    assert "absolute rank 1, not full rank" in err
    with TwinBundle(out) as bundle:
        assert {e.rank for e in bundle.entries.values() if e.kind == "lowrank"} == {1}


def test_a_model_with_another_shape_is_refused(family, tmp_path, capsys):
    from mergekit_like.demo import LlamaShape

    other = tiny_family(tmp_path / "other", n_tasks=1,
                        shape=LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=40,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    doc = twin_doc(family, rank=0.25)
    doc["models"][2]["model"] = str(other[1])
    code, out, err = merge(tmp_path, capsys, doc)
    assert code == 2 and "has shape" in err and "mlp" in err
    assert not out.exists()
