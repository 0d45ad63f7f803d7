"""Merge benchmark: wall time and peak RSS of each method, as ratios to the I/O floor.

    python scripts/bench.py                      # ~0.5 B params per model (16 layers), bf16
    python scripts/bench.py --layers 4 16        # also checks peak RSS stays flat as models grow
    python scripts/bench.py --small              # a quick smoke run (tiny models)

For each family size it generates (once, cached under .bench/) a Llama-shaped base + 3
fine-tunes in bf16, then runs, each in a fresh child process measured side by side:

* floor: read every input tensor with the project's reader and write one model-sized output with
  the project's writer: the I/O any merge must do;
* linear, task_arithmetic, ties (densities 0.5/0.5/0.3), dare_ties: real `mergekit-like merge`;
* the other methods (``NEW_METHODS``): the same, each with the parameters of its example recipe
  ``recipes/<method>.yml`` pointed at the bench family (``model_stock`` with filter_wise true).

``--methods`` picks a subset (default: all). ``--baseline DIR`` also runs each method with the
package found in DIR (e.g. a copy of an older ``mergekit_like``), right before the current one,
so that before/after ratios come from one interleaved run (rows ``<method>@baseline``, and
``floor@baseline``: the floor uses the package's reader and writer too).

Each run reports its wall time and its CPU time (user + system, all threads; steadier than the
wall time on a shared machine, which shows in the wall time only), both also as ratios to the
floor's. Inputs are read once before timing so every run sees the same (warm) page cache.
Targets (2-core CPU): task_arithmetic ≤ 1.5× floor, ties ≤ 2.5× floor, peak RSS ≤ 1.5 GB and
flat (±20 %) from 4 to 16 layers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".bench"
CORE_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties"]
NEW_METHODS = ["slerp", "nuslerp", "multislerp", "karcher", "passthrough", "nearswap",
               "arcee_fusion", "model_stock", "breadcrumbs", "breadcrumbs_ties", "della",
               "della_linear", "sce", "ram", "ramplus_tl"]
METHODS = CORE_METHODS + NEW_METHODS
DEMO_PREFIX = "./demo_models/"


def shape_for(layers: int, small: bool):
    from mergekit_like.demo import LlamaShape

    if small:
        return LlamaShape(vocab_size=2048, hidden_size=256, intermediate_size=704,
                          num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4)
    return LlamaShape(vocab_size=32000, hidden_size=1536, intermediate_size=4096,
                      num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=4)


def family(layers: int, small: bool) -> Path:
    import torch

    from mergekit_like.demo import make_family

    root = WORK / f"family-{'small' if small else 'full'}-{layers}"
    if not (root / "ft3" / "config.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"generating {root.name} ({shape_for(layers, small).num_params() / 1e6:.0f} M params "
              "per model) …", flush=True)
        make_family(root, shape_for(layers, small), n_finetunes=3, dtype=torch.bfloat16,
                    delta_scale=0.002, shard_bytes=[2 * 10**9, 10**9, 2 * 10**9, 5 * 10**8])
    return root


def recipe(method: str, fam: Path) -> dict:
    if method in NEW_METHODS:
        return example_recipe(method, fam)
    densities = [0.5, 0.5, 0.3]
    models = []
    for k in (1, 2, 3):
        params = {"weight": 1.0 if method != "linear" else 1 / 3}
        if method in ("ties", "dare_ties"):
            params["density"] = densities[k - 1]
        models.append({"model": str(fam / f"ft{k}"), "parameters": params})
    doc = {"merge_method": method, "models": models, "dtype": "float32", "out_dtype": "bfloat16"}
    if method != "linear":
        doc["base_model"] = str(fam / "base")
    else:
        models.insert(0, {"model": str(fam / "base"), "parameters": {"weight": 0.0}})
    return doc


def example_recipe(method: str, fam: Path) -> dict:
    """recipes/<method>.yml with its ``./demo_models/<name>`` paths pointed at the family."""
    doc = yaml.safe_load((ROOT / "recipes" / f"{method}.yml").read_text())

    def point(path: str) -> str:
        if not path.startswith(DEMO_PREFIX):
            raise SystemExit(f"recipes/{method}.yml: unexpected model path {path!r}")
        return str(fam / path[len(DEMO_PREFIX):])

    if "base_model" in doc:
        doc["base_model"] = point(doc["base_model"])
    for entry in doc["models"]:
        entry["model"] = point(entry["model"])
    if method == "model_stock":
        doc.setdefault("parameters", {})["filter_wise"] = True
    return doc


# ---- child processes: one measured run each ----------------------------------------------

def child_floor(fam: Path, out: Path) -> None:
    """Read every tensor of every input (project reader), write the base's tensors as one output
    (project writer): the floor any merge pays."""
    from mergekit_like.engine.options import MergeOptions
    from mergekit_like.engine.read import read_ahead
    from mergekit_like.io.local import LocalSource
    from mergekit_like.io.output import OutputFolder
    from mergekit_like.io.shards import plan_shards
    from mergekit_like.io.writer import AsyncShardWriter, iter_write_order
    from mergekit_like.methods.base import OutputSpec

    sources = [LocalSource(fam / n, n) for n in ("base", "ft1", "ft2", "ft3")]
    infos = sources[0].tensors()
    shards = plan_shards([OutputSpec(n, i.shape, i.torch_dtype) for n, i in infos.items()], 5 * 10**9)
    folder = OutputFolder(out, overwrite=True, resume=False, resume_key="floor",
                          planned_bytes=sum(s.file_size for s in shards))
    folder.prepare()
    writer = AsyncShardWriter(folder, shards, max_queue_bytes=MergeOptions().read_ahead_bytes)
    # the same read-ahead thread as the engine: the next tensor is read while this one is written
    names = iter(iter_write_order(shards))
    budget = MergeOptions().read_ahead_bytes  # the engine's read-ahead rule, for a fair floor
    reads = read_ahead(names, lambda n: [s.read_tensor(n) for s in sources],
                       size=lambda n: 4 * infos[n].nbytes, budget=budget)
    for name, tensors in reads:
        writer.submit(name, tensors[0])
        del tensors
    writer.close()
    folder.finalize()


def child_merge(recipe_path: Path, out: Path) -> None:
    from mergekit_like.cli import main

    code = main(["merge", str(recipe_path), str(out), "--quiet", "--overwrite", "--device", "cpu"])
    if code:
        raise SystemExit(code)


def run_child(kind: str, arg: Path, out: Path, pythonpath: Path | None = None) -> dict:
    """One measured child; ``pythonpath``: import ``mergekit_like`` from there instead."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", kind, str(arg), str(out)]
    env = None
    if pythonpath is not None:
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result


def warm_cache(fam: Path) -> None:
    for f in fam.rglob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass


def report(tag: str, name: str, r: dict, floor: dict) -> None:
    """One run's figures as they come (stderr), so a long session shows its progress."""
    print(f"[{tag}] {name:<25}{r['wall_s']:>8.2f} s{r['wall_s'] / floor['wall_s']:>7.2f}×"
          f"{r['cpu_s']:>8.2f} cpu s{r['peak_rss'] / 1e9:>7.2f} GB", file=sys.stderr, flush=True)


def bench_family(layers: int, small: bool, repeat: int, methods: list[str],
                 baseline: Path | None = None) -> dict[str, dict]:
    """Each run ``repeat`` times, interleaved (floor, methods, floor, methods, …), so slow
    phases of a shared machine hit every run alike; the minimum wall time and the maximum
    peak RSS are kept."""
    fam = family(layers, small)
    warm_cache(fam)
    out = WORK / "out"
    paths = {}
    for method in methods:
        paths[method] = WORK / f"{method}.yml"
        paths[method].write_text(yaml.safe_dump(recipe(method, fam), sort_keys=False))
    runs: dict[str, list[dict]] = {"floor": []}
    if baseline is not None:   # the floor uses the project's reader and writer too
        runs["floor@baseline"] = []
    for method in methods:
        if baseline is not None:
            runs[f"{method}@baseline"] = []
        runs[method] = []
    for i in range(repeat):
        runs["floor"].append(run_child("floor", fam, out))
        report(f"{layers}L #{i + 1}", "floor", runs["floor"][-1], runs["floor"][-1])
        if baseline is not None:
            runs["floor@baseline"].append(run_child("floor", fam, out, baseline))
            report(f"{layers}L #{i + 1}", "floor@baseline", runs["floor@baseline"][-1],
                   runs["floor"][-1])
        for method in methods:
            if baseline is not None:
                name = f"{method}@baseline"
                runs[name].append(run_child("merge", paths[method], out, baseline))
                report(f"{layers}L #{i + 1}", name, runs[name][-1], runs["floor"][-1])
            runs[method].append(run_child("merge", paths[method], out))
            report(f"{layers}L #{i + 1}", method, runs[method][-1], runs["floor"][-1])
    return {name: {"wall_s": min(r["wall_s"] for r in rs), "cpu_s": min(r["cpu_s"] for r in rs),
                   "peak_rss": max(r["peak_rss"] for r in rs)} for name, rs in runs.items()}


def peak_rss(usage: resource.struct_rusage) -> int:
    """This process's peak RSS in bytes: VmHWM of /proc/self/status where there is one (Linux
    carries ``ru_maxrss`` over from the parent across fork + exec, so a child started after the
    parent generated a family reported the parent's peak), else ``ru_maxrss``."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description="mergekit_like merge benchmark")
    parser.add_argument("--layers", type=int, nargs="+", default=[16])
    parser.add_argument("--small", action="store_true", help="tiny models (smoke run)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (min kept)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS,
                        help="methods to run (default: all)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="also run each method with the mergekit_like package in this folder")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "ARG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, arg, out = args.child
        import mergekit_like.cli.app  # noqa: F401 - imports are not part of the measured work
        import mergekit_like.engine.run  # noqa: F401
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        cpu0 = usage0.ru_utime + usage0.ru_stime
        start = time.perf_counter()
        (child_floor if kind == "floor" else child_merge)(Path(arg), Path(out))
        wall = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = usage.ru_utime + usage.ru_stime - cpu0
        print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_rss": peak_rss(usage)}))
        return

    WORK.mkdir(exist_ok=True)
    table: dict[int, dict[str, dict]] = {}
    for layers in args.layers:
        table[layers] = bench_family(layers, args.small, args.repeat, args.methods,
                                     args.baseline)
    for layers, results in table.items():
        floor = results["floor"]["wall_s"]
        params = shape_for(layers, args.small).num_params()
        print(f"\n{layers} layers, {params / 1e6:.0f} M params per model, base + 3 fine-tunes, bf16"
              f" (best of {args.repeat})")
        cpu_floor = results["floor"]["cpu_s"]
        print(f"{'run':<25}{'wall s':>9}{'× floor':>9}{'cpu s':>9}{'× floor':>9}{'peak RSS':>11}")
        for name, r in results.items():
            print(f"{name:<25}{r['wall_s']:>9.2f}{r['wall_s'] / floor:>9.2f}"
                  f"{r['cpu_s']:>9.2f}{r['cpu_s'] / cpu_floor:>9.2f}"
                  f"{r['peak_rss'] / 1e9:>9.2f} GB")
    if len(table) > 1:
        lo, hi = min(table), max(table)
        print(f"\npeak RSS, {hi} layers / {lo} layers:")
        for name in [n for n in table[lo] if n in table[hi]]:
            ratio = table[hi][name]["peak_rss"] / table[lo][name]["peak_rss"]
            print(f"  {name:<16}{ratio:.2f}")


if __name__ == "__main__":
    main()
