"""`mergekit-like twin materialize` (docs/methods/twin.md §6) against bundles written by the test oracle
(tests/twin_fixture.py: exact SVD, shared = task arithmetic λ 0.3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from support.helpers import config_of, load_folder, run_cli, shard_names
from support.twin_fixture import hand_bundle, tiny_family

TASKS = ["a", "b"]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    return tiny_family(tmp_path_factory.mktemp("family"), n_tasks=2)


@pytest.fixture(scope="module")
def bundles(family, tmp_path_factory) -> dict[float, Path]:
    """Bundles of the same family at several rank fractions; the full-rank one also carries
    side files that must (tokenizer) or must not (README, recipe) reach the output."""
    root = tmp_path_factory.mktemp("bundles")
    out = {r: hand_bundle(root / f"r{r}", family, TASKS, rank=r) for r in (0.1, 0.25, 0.5, 1.0)}
    (out[1.0] / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    (out[1.0] / "README.md").write_text("# the bundle's card\n")
    (out[1.0] / "mergekit_config.yml").write_text("merge_method: twin\n")
    return out


def _lowrank(bundle: Path) -> dict[str, dict]:
    tensors = json.loads((bundle / "twin" / "twin.json").read_text())["tensors"]
    return {n: e for n, e in tensors.items() if e["kind"] == "lowrank"}


def _materialize(bundle: Path, out: Path, capsys, *args) -> tuple[int, str]:
    code, _, err = run_cli(["twin", "materialize", bundle, out, "-q", *args], capsys)
    return code, err


def _factors(bundle: Path, task: str) -> dict[str, torch.Tensor]:
    return load_folder(bundle / "twin" / task)


def test_full_rank_task_reproduces_the_finetune(family, bundles, tmp_path, capsys):
    bundle = bundles[1.0]
    shared = load_folder(bundle)
    lowrank = _lowrank(bundle)
    assert lowrank
    for k, task in enumerate(TASKS, start=1):
        out = tmp_path / task
        code, err = _materialize(bundle, out, capsys, "--task", task)
        assert code == 0, err
        got, ft = load_folder(out), load_folder(family[k])
        assert set(got) == set(shared)
        for name, s in shared.items():
            if name in lowrank:
                assert (got[name] - ft[name]).abs().max() < 1e-5, name
                assert not torch.equal(got[name], s), name
            else:
                assert torch.equal(got[name], s), name
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert "tokenizer_config.json" in names and "twin" not in names
    assert "mergekit_config.yml" not in names
    card = (tmp_path / "a" / "README.md").read_text()
    assert str(bundle) in card and "a=1, b=0" in card and "the bundle's card" not in card


def test_zero_weights_reproduce_the_shared_model_bit_for_bit(bundles, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _materialize(bundles[0.5], out, capsys, "--weights", "a=0,b=0")
    assert code == 0, err
    assert "warning:" in err and "sum to 0" in err
    got, shared = load_folder(out), load_folder(bundles[0.5])
    assert set(got) == set(shared)
    assert all(torch.equal(got[n], shared[n]) and got[n].dtype == shared[n].dtype for n in shared)


def test_error_decreases_with_rank(family, bundles, tmp_path, capsys):
    ft = load_folder(family[1])
    errors = []
    for rank in (0.1, 0.25, 0.5, 1.0):
        out = tmp_path / f"r{rank}"
        code, err = _materialize(bundles[rank], out, capsys, "--task", "a")
        assert code == 0, err
        got = load_folder(out)
        sq = sum(float(((got[n] - ft[n]) ** 2).sum()) for n in _lowrank(bundles[rank]))
        errors.append(sq ** 0.5)
    assert all(x > y for x, y in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4


def test_mixed_weights_match_hand_computation(bundles, tmp_path, capsys):
    bundle = bundles[0.5]
    out = tmp_path / "out"
    code, err = _materialize(bundle, out, capsys, "--weights", "a=0.7, b=0.3")
    assert code == 0, err
    assert "warning:" not in err
    got, shared = load_folder(out), load_folder(bundle)
    fa, fb = _factors(bundle, "a"), _factors(bundle, "b")
    for name, s in shared.items():
        want = s
        if name in _lowrank(bundle):
            want = (s + 0.7 * fa[name + ".twin_A"] @ fa[name + ".twin_B"]
                    + 0.3 * fb[name + ".twin_A"] @ fb[name + ".twin_B"])
        assert torch.allclose(got[name], want, atol=1e-6, rtol=0), name


def test_one_task_named_in_weights_others_zero(bundles, tmp_path, capsys):
    out_w, out_t = tmp_path / "w", tmp_path / "t"
    assert _materialize(bundles[0.5], out_w, capsys, "--weights", "b=1")[0] == 0
    assert _materialize(bundles[0.5], out_t, capsys, "--task", "b")[0] == 0
    got_w, got_t = load_folder(out_w), load_folder(out_t)
    assert all(torch.equal(got_w[n], got_t[n]) for n in got_t)


def _assert_failed(code: int, err: str, out: Path, *needles: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not (out.parent / f".{out.name}.partial").exists()
    assert not (out.parent / f".{out.name}.lock").exists()


@pytest.mark.parametrize("args, needles", [
    (["--task", "zzz"], ["unknown task 'zzz'", "a, b"]),
    (["--weights", "a=0.5,zzz=0.5"], ["unknown task 'zzz'", "a, b"]),
    (["--weights", "a:0.5"], ["--weights", "a:0.5"]),
    (["--weights", "a=x"], ["--weights", "a=x"]),
    (["--weights", "a=nan"], ["not finite"]),
    (["--weights", "a=0.5,a=0.5"], ["given twice"]),
    ([], ["exactly one of --task"]),
    (["--task", "a", "--weights", "a=1"], ["exactly one of --task"]),
    (["--task", "a", "--out-dtype", "int8"], ["--out-dtype", "int8"]),
])
def test_bad_arguments(bundles, tmp_path, capsys, args, needles):
    out = tmp_path / "out"
    code, err = _materialize(bundles[0.25], out, capsys, *args)
    _assert_failed(code, err, out, *needles)


def test_broken_bundles(bundles, tmp_path, capsys):
    missing_task = shutil.copytree(bundles[0.25], tmp_path / "missing_task")
    shutil.rmtree(missing_task / "twin" / "b")
    missing_factor = shutil.copytree(bundles[0.25], tmp_path / "missing_factor")
    path = missing_factor / "twin" / "a" / "exclusive.safetensors"
    factors = load_folder(path.parent)
    dropped = sorted(n for n in factors if n.endswith(".twin_B"))[0]
    del factors[dropped]
    save_file(factors, str(path), metadata={"format": "pt"})
    for bundle, needles in ((missing_task, ["task 'b'", "twin/b/"]),
                            (missing_factor, [f"'{dropped}'", "missing"])):
        out = tmp_path / f"out_{bundle.name}"
        code, err = _materialize(bundle, out, capsys, "--task", "a")
        _assert_failed(code, err, out, *needles)


def test_existing_out_needs_overwrite(bundles, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, err = _materialize(bundles[0.25], out, capsys, "--task", "a")
    assert code == 2 and "--overwrite" in err
    assert (out / "keep.txt").exists()
    code, err = _materialize(bundles[0.25], out, capsys, "--task", "a", "--overwrite")
    assert code == 0, err
    assert not (out / "keep.txt").exists()
    code, err = _materialize(bundles[0.25], bundles[0.25], capsys, "--task", "a", "--overwrite")
    assert code == 2 and "inside it" in err and (bundles[0.25] / "twin").is_dir()


def test_verify_bf16_shards_and_transformers_load(bundles, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _materialize(bundles[0.5], out, capsys, "--weights", "a=0.5,b=0.5",
                             "--out-dtype", "bfloat16", "--out-shard-size", "30KB")
    assert code == 0, err
    code, stdout, err = run_cli(["verify", out], capsys)
    assert code == 0 and "ok:" in stdout, err
    got = load_folder(out)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert config_of(out)["torch_dtype"] == "bfloat16"
    assert len(shard_names(out)) > 1 and (out / "model.safetensors.index.json").is_file()
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    params = dict(model.named_parameters())
    name = next(n for n in got if n.endswith("q_proj.weight"))
    assert torch.equal(params[name].detach().to(torch.bfloat16), got[name])


def test_dense_parts_and_integer_buffers(family, tmp_path, capsys):
    """dense_small: 1-D block tensors get w_t·δ_t too; a non-float tensor is copied as stored."""
    bundle = hand_bundle(tmp_path / "dense", family, TASKS, rank=1.0, dense_small=True)
    shared = load_folder(bundle)
    shared["model.rotary_steps"] = torch.arange(7, dtype=torch.int64)
    save_file(shared, str(bundle / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    code, err = _materialize(bundle, out, capsys, "--task", "b", "--out-dtype", "float16")
    assert code == 0, err
    got, ft = load_folder(out), load_folder(family[2])
    kinds = json.loads((bundle / "twin" / "twin.json").read_text())["tensors"]
    dense = [n for n, e in kinds.items() if e["kind"] == "dense"]
    assert dense
    for name in dense + list(_lowrank(bundle)):
        assert got[name].dtype == torch.float16, name
        assert torch.allclose(got[name].float(), ft[name], rtol=1e-3, atol=1e-5), name
    assert got["model.rotary_steps"].dtype == torch.int64
    assert torch.equal(got["model.rotary_steps"], shared["model.rotary_steps"])
