"""Shared test helpers: run the CLI in-process, write recipes, load outputs, reference math."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import safe_open

from mergekit_like.cli import main
from mergekit_like.demo import LlamaShape, make_family


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expect_merge_error(tmp_path: Path, capsys, doc: dict | str, *needles: str,
                       extra: tuple = ()) -> str:
    """``merge`` of ``doc`` fails the way bad input must: exit code 2, one ``error:`` line on
    stderr holding every needle, no traceback, nothing at OUT and no partial folder or lock
    left beside it. Returns the error line."""
    recipe = write_recipe(tmp_path / "recipe.yml", doc)
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(["merge", recipe, out, "-q", *extra], capsys)
    line = assert_one_line_error(code, err, *needles)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no partial folder, no lock
    return line


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """Bad input's shape: exit code 2, one ``error:`` line on stderr (warnings aside) holding
    every needle, no traceback. Returns the error line."""
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("warning:")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write_recipe(path: Path, doc: dict | str) -> Path:
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (single file or sharded)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file in a folder (bit-identity checks)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).iterdir()) if p.is_file()}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard_names(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).glob("model-*.safetensors"))


def config_of(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


SMALL_SHAPE = LlamaShape(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
"""A 2-layer Llama small enough for per-method CLI tests."""


def small_family(root: Path, **kw) -> Path:
    """base, ft1, ft2 of SMALL_SHAPE (float32, ft1 sharded) under ``root``; ``kw`` goes to
    ``make_family`` (delta_scale, seed)."""
    make_family(root, SMALL_SHAPE, n_finetunes=2, dtype=torch.float32,
                shard_bytes=[None, 4_000, None], **kw)
    return root


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file of a folder by relative path (what a fake Hub repo is given)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def ties_recipe(base: str, ft1: str, ft2: str) -> dict:
    """A two-model TIES recipe over ``base`` (Hub ids or folders)."""
    return {"merge_method": "ties", "base_model": base,
            "models": [{"model": ft1, "parameters": {"weight": 1.0, "density": 0.5}},
                       {"model": ft2, "parameters": {"weight": 0.5, "density": 0.7}}],
            "dtype": "float32"}


def plan_params(method, params: dict | None = None, model_params=()) -> tuple[dict, list[dict]]:
    """A method's (method-wide, per-model) parameters as the plan resolves them for a tensor:
    the given values over the spec's defaults (REQUIRED ones must be given), what a hand-built
    TensorTask needs."""
    from mergekit_like.recipe.spec import REQUIRED

    spec = method.spec
    full = {p.name: p.default for p in spec.params if not p.per_model and p.default is not REQUIRED}
    full.update(params or {})
    per_model = []
    for mp in model_params:
        d = {p.name: p.default for p in spec.params if p.per_model and p.default is not REQUIRED}
        d.update(mp)
        per_model.append(d)
    return full, per_model


# ---- independent reference implementations (plain, unoptimised) ---------------------------

def ref_topk_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Exact top-k by |delta| with torch.topk (the test oracle for TIES trimming)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    flat = delta.abs().reshape(-1)
    k = max(1, int(density * flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.topk(flat, k).indices] = True
    return mask.reshape(delta.shape)


def ref_ties(base, xs, weights, densities, normalize=True, lam=1.0):
    trimmed = [w * (x - base) * ref_topk_mask(x - base, d)
               for x, w, d in zip(xs, weights, densities)]
    total = sum(trimmed)
    sign = torch.where(total >= 0, 1.0, -1.0)
    agree = [torch.sign(t) == sign for t in trimmed]
    delta = sum(t * a for t, a in zip(trimmed, agree))
    if normalize:
        denom = sum(w * a.float() for w, a in zip(weights, agree))
        denom = torch.where(denom == 0, torch.ones_like(denom), denom)
        delta = delta / denom
    return base + lam * delta


_M64 = (1 << 64) - 1


def ref_splitmix_u(seed: int, model_index: int, name: str, numel: int) -> np.ndarray:
    """u_j, the top 24 bits of SplitMix64 output j keyed by (seed, model, tensor), written with
    numpy uint64 (docs/methods/dare.md §2): the independent oracle of every counter-based draw."""
    key = int.from_bytes(hashlib.sha256(f"{seed}:{model_index}:{name}".encode()).digest()[:8],
                         "little")
    j = np.arange(numel, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (j + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z >> np.uint64(40)


def ref_dare_keep(seed: int, model_index: int, name: str, numel: int, density: float) -> np.ndarray:
    """The normative SplitMix64 keep mask: u_j < ⌊density·2²⁴⌋."""
    return ref_splitmix_u(seed, model_index, name, numel) < np.uint64(int(density * (1 << 24)))