"""Golden outputs: every recipe in recipes/, and variants that take the fused CPU path and the
torch path, merged on the demo family give exactly the tensors recorded in
tests/methods/golden/outputs.json (sha256 per tensor), recorded before the package was reorganised.

Record a new recipe's outputs (recorded ones must come out unchanged; a change of the math is
made on purpose by deleting that record first, never to make a test pass):

    python tests/methods/test_golden_outputs.py --write
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("golden") / "outputs.json"
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yml"))
VARIANTS = {  # name -> (recipe text, MERGEKIT_LIKE_FUSED values that must all give these bits)
    "ties_bf16_in_fused_vs_torch": ("""
merge_method: ties
base_model: ./demo_models/base
models:
  - {model: ./demo_models/ft1, parameters: {weight: 0.7, density: 0.3}}
  - {model: ./demo_models/ft2, parameters: {weight: 1.0, density: 0.6}}
  - {model: ./demo_models/ft3, parameters: {weight: 0.4, density: [0.9, 0.2]}}
parameters: {normalize: false, lambda: 1.3}
out_dtype: bfloat16
""", ("1", "0")),
    "task_arithmetic_fused_vs_torch": ("""
merge_method: task_arithmetic
base_model: ./demo_models/base
models:
  - {model: ./demo_models/ft1, parameters: {weight: [0.2, 0.9]}}
  - {model: ./demo_models/ft3, parameters: {weight: -0.5}}
parameters: {lambda: 0.8}
dtype: float32
out_dtype: float32
""", ("1", "0")),
    "dare_ties_fused_vs_torch": ("""
merge_method: dare_ties
base_model: ./demo_models/base
models:
  - {model: ./demo_models/ft1, parameters: {weight: 1.0, density: 0.4}}
  - {model: ./demo_models/ft2, parameters: {weight: 0.5, density: 0.7}}
parameters: {rescale: true}
seed: 7
out_dtype: bfloat16
""", ("1", "0")),
    "dare_linear_l1_fused_vs_torch": ("""
merge_method: dare_linear
base_model: ./demo_models/base
models:
  - {model: ./demo_models/ft2, parameters: {weight: 0.6, density: 0.5}}
  - {model: ./demo_models/ft3, parameters: {weight: 0.4, density: 0.8}}
parameters: {rescale: l1}
seed: 3
dtype: float32
""", ("1", "0")),
    "ties_f16_load_rounding": ("""
merge_method: ties
base_model: ./demo_models/base
models:
  - {model: ./demo_models/ft1, parameters: {weight: 1.0, density: 0.2}}
  - {model: ./demo_models/ft2, parameters: {weight: [{filter: self_attn, value: 0.3}, {value: 1.0}], density: 0.5}}
dtype: float16
out_dtype: float16
""", ("1", "0")),
}


def make_demo(root: Path) -> Path:
    """The demo family of scripts/make_demo_models.py, plus a deterministic RCP votes folder
    (hand-made counts instead of the gradient passes, whose bits may depend on threads)."""
    from mergekit_like.demo import LlamaShape, make_family

    demo = root / "demo_models"
    make_family(demo, LlamaShape(), n_finetunes=3, dtype=torch.bfloat16,
                shard_bytes=[None, None, 60_000, None])
    votes = demo / "rcp_votes_1e3"
    votes.mkdir()
    rng = np.random.default_rng(0)
    tensors = {}
    for f in sorted((demo / "ft2").glob("model-*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                shape = h.get_slice(name).get_shape()
                tensors[name] = torch.from_numpy(rng.integers(-8, 9, size=shape, dtype=np.int8))
    save_file(tensors, str(votes / "model.safetensors"), metadata={"kind": "rcp_votes"})
    (votes / "importance.json").write_text(json.dumps({
        "kind": "rcp_votes", "fisher_kind": "grad_x_weight_sq", "zero_grad": "merge",
        "n_examples": "8", "max_length": "1024", "dtype": "int8", "models": "{}",
        "penalty_lambda": "1000.0", "tool_version": "golden"}))
    make_stats_folders(demo, rng)
    return demo


def make_stats_folders(demo: Path, rng) -> None:
    """Hand-made Gram (XᵀX/T of random inputs) and Fisher (|random|) folders for each fine-tune,
    named as recipes/regmean.yml and recipes/fisher.yml expect."""
    from mergekit_like.fisher.fisher_pass import FISHER_KIND
    from mergekit_like.regmean.gram_pass import GRAM_KIND
    from mergekit_like.runtime.stats_folder import write_stats_folder

    for model in ("ft1", "ft2", "ft3"):
        grams, fishers = {}, {}
        for f in sorted((demo / model).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    shape = h.get_slice(name).get_shape()
                    fishers[name] = torch.from_numpy(np.abs(rng.standard_normal(shape)).astype(np.float32))
                    if name.endswith(("proj.weight", "lm_head.weight")):
                        x = rng.standard_normal((2 * shape[1], shape[1]))
                        grams[name] = torch.from_numpy((x.T @ x / len(x)).astype(np.float32))
        norm = float(np.sqrt(sum(float((t.double() ** 2).sum()) for t in fishers.values())))
        write_stats_folder(demo / f"gram_{model}", grams, {"kind": GRAM_KIND}, {},
                           overwrite=False)
        write_stats_folder(demo / f"fisher_stats_{model}", fishers,
                           {"kind": FISHER_KIND, "fisher_norm": repr(norm)}, {}, overwrite=False)


def tensor_digests(folder: Path) -> dict[str, str]:
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        rel = f.relative_to(folder).as_posix()
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                t = h.get_tensor(name)
                data = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
                out[f"{rel}:{name}"] = hashlib.sha256(
                    f"{t.dtype}{list(t.shape)}".encode() + data).hexdigest()
    return out


def merge_digests(work: Path, name: str, text: str | None, fused: str) -> dict[str, str]:
    from mergekit_like.cli import main

    recipe = ROOT / "recipes" / name if text is None else work / f"{name}.yml"
    if text is not None:
        recipe.write_text(text)
    out = work / f"out-{name}-{fused}"
    old = os.environ.get("MERGEKIT_LIKE_FUSED")
    os.environ["MERGEKIT_LIKE_FUSED"] = fused
    cwd = os.getcwd()
    try:
        os.chdir(work)
        code = main(["merge", str(recipe), str(out), "-q", "--device", "cpu",
                     "--out-shard-size", "200KB"])
    finally:
        os.chdir(cwd)
        if old is None:
            os.environ.pop("MERGEKIT_LIKE_FUSED", None)
        else:
            os.environ["MERGEKIT_LIKE_FUSED"] = old
    assert code == 0, f"merge of {name} failed"
    digests = tensor_digests(out)
    shutil.rmtree(out)
    return digests


def all_cases() -> list[tuple[str, str | None, str]]:
    cases = [(name, None, "1") for name in RECIPES]
    cases += [(name, text, fused) for name, (text, values) in VARIANTS.items() for fused in values]
    return cases


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("golden")
    make_demo(root)
    return root


@pytest.fixture(scope="module")
def golden() -> dict[str, dict[str, str]]:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name,text,fused", all_cases(),
                         ids=[f"{n}-fused{f}" for n, _, f in all_cases()])
def test_output_bits_are_the_recorded_ones(work, golden, name, text, fused):
    got = merge_digests(work, name, text, fused)
    options = records_for_this_cpu(golden[name])
    for want in options:
        assert sorted(got) == sorted(want)
    differing = min(([k for k in want if got[k] != want[k]] for want in options), key=len)
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def records_for_this_cpu(record: dict) -> list[dict[str, str]]:
    """The records the output must equal one of. A case whose bits depend on torch's
    vectorised exp/log (arcee_fusion's softmax: the AVX2 and AVX-512 kernels round
    differently) holds one record per CPU capability: this CPU's own, or, on a CPU without
    one, any of them."""
    options = record.get(BY_CPU)
    if options is None:
        return [record]
    if cpu_capability() in options:
        return [options[cpu_capability()]]
    return list(options.values())


BY_CPU = "by_cpu_capability"


def test_every_recipe_has_a_golden_record(golden):
    assert set(RECIPES) | set(VARIANTS) == set(golden)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    # Records the cases that have no record yet; a recorded case whose bits changed is an error
    # (delete its record by hand if the math changed on purpose).
    import tempfile
    known = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(tmp)
        make_demo(work_dir)
        record: dict[str, dict[str, str]] = {}
        for case_name, case_text, case_fused in all_cases():
            digests = merge_digests(work_dir, case_name, case_text, case_fused)
            if BY_CPU in known.get(case_name, {}):
                by_cpu = dict(known[case_name][BY_CPU])
                assert by_cpu.setdefault(cpu_capability(), digests) == digests, case_name
                record[case_name] = {BY_CPU: by_cpu}
                continue
            assert record.setdefault(case_name, digests) == digests, case_name
            assert known.get(case_name, digests) == digests, f"{case_name}: recorded bits changed"
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN}: {len(record)} outputs ({len(set(record) - set(known))} new)")
