"""Parity with mergekit 0.1.5: the same recipes through both tools, compared tensor by tensor.

    python scripts/parity_mergekit.py                 # install (once), merge, print, update the doc
    python scripts/parity_mergekit.py --methods ties slerp --no-doc
    python scripts/parity_mergekit.py --work /tmp/parity --jobs 4

Not part of CI. It creates ``.parity-venv/`` at the repository root
(``python -m venv --system-site-packages``) and installs ``mergekit==0.1.5`` into it with pip,
constraining torch to the version already installed (no CUDA wheel is pulled); that pip step is
the only network access, and it is skipped once mergekit imports from the venv. Both tools then run
offline (HF_HUB_OFFLINE=1) on CPU on a tiny float32 Llama family made by
``mergekit_like.demo.make_family`` (base + 3 fine-tunes), one small recipe per method with
mergekit's parameter names, ``dtype``/``out_dtype`` float32:

* ``mergekit-yaml RECIPE OUT --no-copy-tokenizer --quiet --random-seed 0`` (in the venv),
* ``mergekit-like merge RECIPE OUT2 -q`` (this interpreter).

Deterministic methods: max |diff| over all tensors, and the largest per-tensor max |diff| / max
|mergekit value|. Random methods (dare_*, della*): the masks come from different generators, so
instead the task-vector norm ratio ‖ours − base‖ / ‖mergekit − base‖ and each model's kept
fraction (one more merge per model with the other weights set to 0; kept means out ≠ base).
The recipe shapes of recipes/shapes/ (slices: layer stacking, per-slice gradients and
parameters) are compared the same way, one row each. One markdown row per method goes to stdout and, unless --no-doc, between the table markers of
docs/parity.md. Methods missing from mergekit's registry are reported, not failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from mergekit_like.demo import LlamaShape, make_family
from mergekit_like.registry import method_names

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # its sibling doc_markers.py, also when loaded by path
from doc_markers import replace_between  # noqa: E402
VENV = REPO / ".parity-venv"
DOC = REPO / "docs" / "parity.md"
SHAPES = sorted((REPO / "recipes" / "shapes").glob("*.yml"))
MERGEKIT = "mergekit==0.1.5"
RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")
SKIP = ("twin", "wemoe", "rcp", "rcp_approx")  # mergekit_like's own methods
START, END = "<!-- parity-table:start -->", "<!-- parity-table:end -->"
SHAPE = LlamaShape(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
LIST_METHODS = """
import json
try:
    from mergekit.merge_methods.registry import registered_methods
    names = [m.spec.name if hasattr(m, "spec") else m.name() for m in registered_methods()]
except ImportError:
    from mergekit.merge_methods import REGISTERED_MERGE_METHODS
    names = list(REGISTERED_MERGE_METHODS)
print(json.dumps(sorted(names)))
"""


def ensure_venv(venv: Path) -> None:
    """Create the venv and pip-install mergekit 0.1.5 unless it already imports there."""
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                       check=True)
    probe = subprocess.run([str(py), "-c", "import mergekit, importlib.metadata as m;"
                            "print(m.version('mergekit'))"], capture_output=True, text=True)
    if probe.returncode == 0 and probe.stdout.strip() == MERGEKIT.split("==")[1]:
        return
    constraints = venv / "parity-constraints.txt"
    constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    print(f"installing {MERGEKIT} into {venv} (torch pinned)", file=sys.stderr)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(constraints), MERGEKIT],
                   check=True)


def mergekit_methods(venv: Path) -> set[str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-c", LIST_METHODS], env=ENV,
                         capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def recipe(method: str, fam: Path) -> dict:
    """The recipe for ``method`` on the family in ``fam`` (mergekit's parameter names)."""
    base, ft = str(fam / "base"), [str(fam / f"ft{k}") for k in (1, 2, 3)]
    dens = [0.5, 0.5, 0.3]

    def models(params: list[dict] | None = None, n: int = 3) -> list[dict]:
        return [{"model": ft[k], **({"parameters": params[k]} if params else {})}
                for k in range(n)]

    sparse = [{"weight": w, "density": d} for w, d in zip([1.0, 0.7, 0.5], dens)]
    r: dict = {"merge_method": method, "base_model": base, "models": models(),
               "dtype": "float32", "out_dtype": "float32"}
    if method == "linear":
        r.pop("base_model")
        r["models"] = models([{"weight": w} for w in (1.0, 0.5, 0.5)])
    elif method == "slerp":
        r["models"] = [{"model": base}, {"model": ft[0]}]
        r["parameters"] = {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"value": 0.5}]}
    elif method == "nuslerp":
        r["models"] = models([{"weight": 0.6}, {"weight": 0.4}], n=2)
    elif method == "multislerp":
        r["models"] = models([{"weight": w} for w in (1.0, 0.5, 0.5)])
    elif method == "karcher":
        r.pop("base_model")
        r["parameters"] = {"max_iter": 10, "tol": 1e-5}
    elif method == "passthrough":
        r.pop("base_model")
        r["models"] = [{"model": ft[0], "parameters": {
            "scale": [{"filter": "down_proj", "value": 0.5}, {"value": 1.0}]}}]
    elif method in ("nearswap", "arcee_fusion"):
        r["models"] = models(n=1)
        if method == "nearswap":
            r["parameters"] = {"t": 0.004}
    elif method == "model_stock":
        r["parameters"] = {"filter_wise": False}
    elif method == "task_arithmetic":
        r["models"] = models([{"weight": w} for w in (1.0, 0.7, 0.5)])
        r["parameters"] = {"lambda": 0.8}
    elif method in ("ties", "dare_ties", "dare_linear"):
        r["models"] = models(sparse)
        r["parameters"] = {"lambda": 1.0}
    elif method.startswith("breadcrumbs"):
        r["models"] = models([{**p, "density": 0.9, "gamma": 0.01} for p in sparse])
    elif method.startswith("della"):
        r["models"] = models([{**p, "epsilon": 0.1} for p in sparse])
    elif method == "sce":
        r["parameters"] = {"select_topk": 0.5}
    elif method == "ram":
        r["parameters"] = {"epsilon": 0.002}
    elif method == "ramplus_tl":
        r["parameters"] = {"epsilon": 0.004, "r": 0.5, "alpha": 1.0}
    if method in RANDOM:
        r["seed"] = 0  # mergekit_like's key; mergekit ignores it and gets --random-seed 0
    return r


def run_tool(tool: str, recipe_path: Path, out: Path, venv: Path) -> str | None:
    """Run one merge; return None on success, else the last line of its error output."""
    if tool == "mergekit":
        cmd = [str(venv / "bin" / "mergekit-yaml"), str(recipe_path), str(out),
               "--no-copy-tokenizer", "--quiet", "--random-seed", "0"]
    else:
        cmd = [sys.executable, "-m", "mergekit_like", "merge", str(recipe_path), str(out), "-q"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    return (lines[-1] if lines else f"exit {proc.returncode}")[:160]


def load(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def merge_both(r: dict, work: Path, tag: str, venv: Path) -> tuple[dict, dict]:
    """Write the recipe, run both tools; raises RuntimeError naming the tool that failed."""
    path = work / f"{tag}.yml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    outs = {t: work / f"{tag}.{t}" for t in ("mergekit", "mergekit_like")}
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    with ThreadPoolExecutor(2) as pool:
        errs = dict(zip(outs, pool.map(lambda t: run_tool(t, path, outs[t], venv), outs)))
    for tool, err in errs.items():
        if err:
            raise RuntimeError(f"{tool} failed: {err}")
    return load(outs["mergekit"]), load(outs["mergekit_like"])


def diff_stats(mk: dict, ml: dict, base: dict) -> dict:
    """Max |diff|, max relative diff and task-vector norm ratio over the shared tensors."""
    if set(mk) != set(ml):
        missing = sorted(set(mk) ^ set(ml))
        raise RuntimeError(f"tensor names differ: {', '.join(missing[:3])}")
    worst, worst_rel, worst_name, tv_ml, tv_mk = 0.0, 0.0, "", 0.0, 0.0
    for name, a in mk.items():
        a, b = a.double(), ml[name].double()
        if a.shape != b.shape:
            raise RuntimeError(f"shape differs for {name}: {tuple(a.shape)} vs {tuple(b.shape)}")
        d = (a - b).abs().max().item()
        rel = d / max(a.abs().max().item(), 1e-30)
        if d > worst:
            worst, worst_name = d, name
        worst_rel = max(worst_rel, rel)
        if name in base and base[name].shape == a.shape:
            ref = base[name].double()
            tv_mk += (a - ref).pow(2).sum().item()
            tv_ml += (b - ref).pow(2).sum().item()
    ratio = (tv_ml / tv_mk) ** 0.5 if tv_mk > 0 else float("nan")
    return {"abs": worst, "rel": worst_rel, "where": worst_name, "tv_ratio": ratio}


def kept_fraction(out: dict, base: dict) -> float:
    kept = total = 0
    for name, t in out.items():
        if name in base and base[name].shape == t.shape:
            kept += (t != base[name]).sum().item()
            total += t.numel()
    return kept / max(total, 1)


def probe_kept(method: str, r: dict, work: Path, base: dict, venv: Path) -> str:
    """Each model's kept fraction, ours/mergekit's: the recipe with every other weight at 0,
    so model k keeps its position (and mask) and out != base exactly where it kept an entry."""
    parts = []
    for k, model in enumerate(r["models"]):
        zeroed = [m if j == k else {**m, "parameters": {**m["parameters"], "weight": 0.0}}
                  for j, m in enumerate(r["models"])]
        mk, ml = merge_both({**r, "models": zeroed}, work, f"{method}.probe{k + 1}", venv)
        d = model["parameters"]["density"]
        parts.append(f"{d}: {kept_fraction(ml, base):.4f}/{kept_fraction(mk, base):.4f}")
    return ", ".join(parts)


def compare(method: str, fam: Path, work: Path, base: dict, venv: Path,
            available: set[str]) -> list[str]:
    """One table row (as cells) for ``method``."""
    if method not in available:
        return [method, "not in mergekit 0.1.5", "", "", "", "", ""]
    r = recipe(method, fam)
    try:
        mk, ml = merge_both(r, work, method, venv)
        s = diff_stats(mk, ml, base)
        kept = probe_kept(method, r, work, base, venv) if method in RANDOM else ""
    except RuntimeError as exc:
        return [method, "error", "", "", "", "", str(exc).replace("|", "/")]
    if method in RANDOM:
        status = f"random (TV norm {100 * (s['tv_ratio'] - 1):+.1f} %)"
    else:
        status = "match" if s["abs"] <= 1e-5 else "differs"
    where = s["where"].removeprefix("model.") if s["abs"] > 0 else ""
    return [method, status, f"{s['abs']:.2e}", f"{s['rel']:.2e}", f"{s['tv_ratio']:.4f}",
            kept, where]


def shape_recipe(path: Path, fam: Path) -> dict:
    """A recipes/shapes example pointed at the parity family, in float32."""
    text = path.read_text().replace("./demo_models/", f"{fam}/")
    return {**yaml.safe_load(text), "dtype": "float32", "out_dtype": "float32"}


def compare_shape(path: Path, fam: Path, work: Path, base: dict, venv: Path) -> list[str]:
    """One table row for a recipe shape (slices): max |diff| over every output tensor."""
    name = f"shape: {path.stem}"
    try:
        mk, ml = merge_both(shape_recipe(path, fam), work, f"shape-{path.stem}", venv)
        s = diff_stats(mk, ml, base)
    except RuntimeError as exc:
        return [name, "error", "", "", "", "", str(exc).replace("|", "/")]
    status = "match" if s["abs"] <= 1e-5 else "differs"
    where = s["where"].removeprefix("model.") if s["abs"] > 0 else ""
    return [name, status, f"{s['abs']:.2e}", f"{s['rel']:.2e}", f"{s['tv_ratio']:.4f}", "",
            where]


def table(rows: list[list[str]]) -> str:
    head = ["method", "status", "max abs diff", "max rel diff", "TV norm ratio (ours/mk)",
            "kept fraction per model (density: ours/mk)", "worst tensor / note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c if c else "—" for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_doc(doc: Path, text: str) -> None:
    """Replace the table between the markers of ``doc`` (append markers if missing)."""
    replace_between(doc, START, END, text, new_page="# Parity with mergekit\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=None, help="default: all shared ones")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mergekit_like_parity"))
    parser.add_argument("--venv", type=Path, default=VENV)
    parser.add_argument("--jobs", type=int, default=4, help="methods merged concurrently")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/parity.md")
    parser.add_argument("--shapes", action="store_true",
                        help="with --methods: also the recipes/shapes examples (slices)")
    args = parser.parse_args(argv)
    ensure_venv(args.venv)
    available = mergekit_methods(args.venv)
    methods = args.methods or [m for m in method_names() if m not in SKIP]
    fam = args.work / "family"
    if not (fam / "ft3" / "config.json").exists():
        make_family(fam, SHAPE, n_finetunes=3, dtype=torch.float32)
    base = load(fam / "base")
    runs = args.work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda m: compare(m, fam, runs, base, args.venv, available),
                             methods))
        if not args.methods or args.shapes:
            rows += list(pool.map(lambda p: compare_shape(p, fam, runs, base, args.venv),
                                  SHAPES))
    text = table(rows)
    print(text)
    if not args.no_doc:
        write_doc(DOC, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
