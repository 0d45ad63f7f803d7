"""Grid benchmark: a 6-point TIES grid as one `mergekit-like grid` run vs six `merge` runs.

    python scripts/bench_grid.py              # base + 3 fine-tunes, ~0.5 B params each, bf16
    python scripts/bench_grid.py --small      # a quick smoke run (tiny models)
    python scripts/bench_grid.py --ray [--small]  # 8-point grid: local 2-worker Ray vs sequential

The family is the one scripts/bench.py generates (cached under .bench/). The grid sweeps λ
(3 values) × the first model's density (2 values). Each measurement runs in a fresh child
process, interleaved, best of --repeat; it prints both wall times and their ratio.
Target (2-core CPU): grid ≤ 0.4× the six separate merges.

``--ray``: an 8-point grid (λ 4 values × density 2, ``--pass-size 4``: two passes) run by the
sequential grid and by ``--executor ray`` on a local Ray of 2 CPUs (one pass per worker, Ray's
start-up included); prints both times and the overhead per point ((ray - sequential) / 8).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench import WORK, family, recipe, warm_cache  # noqa: E402

LAMBDAS = [0.6, 0.8, 1.0]
DENSITIES = [0.3, 0.5]


def grid_doc(fam: Path) -> dict:
    doc = recipe("ties", fam)
    doc["grid"] = {"parameters.lambda": LAMBDAS, "models.0.parameters.density": DENSITIES}
    return doc


def point_recipes(fam: Path) -> list[dict]:
    out = []
    for lam in LAMBDAS:
        for d in DENSITIES:
            doc = recipe("ties", fam)
            doc.setdefault("parameters", {})["lambda"] = lam
            doc["models"][0]["parameters"]["density"] = d
            out.append(doc)
    return out


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def bench_ray(fam: Path, repeat: int) -> None:
    """The 8-point grid, sequential vs a local 2-worker Ray (both with --pass-size 4)."""
    doc = grid_doc(fam)
    doc["grid"] = {"parameters.lambda": [0.6, 0.8, 1.0, 1.2], "models.0.parameters.density": DENSITIES}
    path = WORK / "grid_ray.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    cli = [sys.executable, "-m", "mergekit_like", "grid", str(path)]
    times = {"sequential": float("inf"), "ray": float("inf")}
    for _ in range(repeat):
        for mode, extra in (("sequential", []), ("ray", ["--executor", "ray", "--cpus-per-job", "1"])):
            out = WORK / f"grid_{mode}_out"
            shutil.rmtree(out, ignore_errors=True)
            times[mode] = min(times[mode], timed([*cli, str(out), "--pass-size", "4", "--device",
                                                  "cpu", "-q", *extra]))
            shutil.rmtree(out, ignore_errors=True)
    per_point = (times["ray"] - times["sequential"]) / 8
    print(json.dumps({"points": 8, "passes": 2, "sequential_s": round(times["sequential"], 2),
                      "ray_s": round(times["ray"], 2), "overhead_per_point_s": round(per_point, 3)}))
    print(f"\n8-point grid, 2 passes (best of {repeat}): sequential {times['sequential']:.2f} s, "
          f"ray (2 workers, start-up included) {times['ray']:.2f} s, "
          f"overhead {per_point:+.3f} s per point")


def main() -> None:
    parser = argparse.ArgumentParser(description="grid vs separate merges")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--ray", action="store_true", help="8-point grid: local Ray vs sequential")
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    fam = family(args.layers, args.small)
    warm_cache(fam)
    if args.ray:
        import os
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        bench_ray(fam, args.repeat)
        return
    grid_path = WORK / "grid_ties.yml"
    grid_path.write_text(yaml.safe_dump(grid_doc(fam), sort_keys=False))
    singles = []
    for k, doc in enumerate(point_recipes(fam)):
        singles.append(WORK / f"grid_point_{k}.yml")
        singles[-1].write_text(yaml.safe_dump(doc, sort_keys=False))
    cli = [sys.executable, "-m", "mergekit_like"]
    best_grid = best_sep = float("inf")
    for _ in range(args.repeat):
        shutil.rmtree(WORK / "grid_out", ignore_errors=True)
        best_grid = min(best_grid, timed([*cli, "grid", str(grid_path), str(WORK / "grid_out"),
                                          "--device", "cpu"]))
        total = 0.0
        for path in singles:
            total += timed([*cli, "merge", str(path), str(WORK / "single_out"), "--overwrite",
                            "-q", "--device", "cpu"])
        best_sep = min(best_sep, total)
    shutil.rmtree(WORK / "grid_out", ignore_errors=True)
    shutil.rmtree(WORK / "single_out", ignore_errors=True)
    print(json.dumps({"points": len(singles), "grid_s": round(best_grid, 2),
                      "separate_s": round(best_sep, 2),
                      "ratio": round(best_grid / best_sep, 3)}))
    print(f"\n6-point TIES grid ({args.layers} layers, best of {args.repeat}): grid "
          f"{best_grid:.2f} s, six merges {best_sep:.2f} s, ratio {best_grid / best_sep:.2f} "
          "(target ≤ 0.40)")


if __name__ == "__main__":
    main()
