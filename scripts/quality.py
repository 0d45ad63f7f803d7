"""Merge quality on the zoo: held-out accuracy of the base, each fine-tune and each merge method.

    python scripts/quality.py [--fast] [--zoo DIR] [--seeds S ...] [--work DIR] [--jobs N]
                              [--device D]

Builds or reuses the zoos (see scripts/zoo.py), merges each zoo's skill-task fine-tunes with every
method of ``mergekit_like.zoo.quality.METHODS`` through the ``merge`` command, picks each method's
hyper-parameters on that zoo's validation split, and prints a markdown table of test accuracy
averaged over the zoos; then the same for the reasoning fine-tune merged with the domain
fine-tune (``quality_rcp.RCP_ROWS``: task arithmetic, TIES, RCP, rcp_approx) (stdout; progress on stderr). Merged models go to --work (default: a
temporary folder, removed afterwards).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from mergekit_like.zoo import PRESETS, Zoo
from mergekit_like.zoo.build import build_zoos, seed_dir, to_stderr
from mergekit_like.zoo.quality import format_table, run_quality
from mergekit_like.zoo.quality_rcp import (DOMAIN, REASONING, RCP_ROWS, format_front,
                                            format_gains, pareto_front, trade_off)
from mergekit_like.zoo.script_args import add_zoo_arguments, zoo_request

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # its sibling doc_markers.py, also when loaded by path
from doc_markers import replace_between  # noqa: E402
DOCS = REPO / "docs"
BARS, FRONTS = "quality_accuracy.png", "quality_rcp_tradeoff.png"
START, END = "<!-- quality-run:start -->", "<!-- quality-run:end -->"


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_zoo_arguments(parser, "--zoo")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the merged models here (default: a temporary folder)")
    parser.add_argument("--device", default="auto", help="evaluation device: auto, cpu, cuda[:N]")
    parser.add_argument("--doc", action="store_true",
                        help="also write the tables into docs/quality.md (between its markers) "
                             "and the figures beside it (needs matplotlib: the dev extra)")
    args = parser.parse_args(argv)
    preset, folder, seeds = zoo_request(args, REPO)
    manifests = build_zoos(folder, PRESETS[preset], seeds, jobs=args.jobs, log=to_stderr)
    zoos = [Zoo.open(seed_dir(folder, s)) for s in seeds]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zoo-quality-") as tmp:
        work = args.work or Path(tmp)
        report = run_quality(zoos, work, device=args.device, log=to_stderr)
        rcp = run_quality(zoos, work / "reasoning-domain", methods=RCP_ROWS,
                          merged_tasks=[REASONING, DOMAIN], device=args.device, log=to_stderr,
                          every_test=True)
    built = ", ".join(f"seed {s}: {m['settings_hash']}, built in {m['build_seconds']:.0f} s"
                      for s, m in zip(seeds, manifests))
    curves = trade_off(rcp)
    text = "\n".join([f"{preset} zoo ({built})\n", format_table(report),
                      f"\n### Reasoning + domain ({REASONING} + {DOMAIN})\n", format_table(rcp),
                      "", format_gains(rcp), "", "Trade-off over each method's sweep (test "
                      "accuracy of every candidate, mean over the zoos):", "",
                      format_front(curves)])
    print(text)
    if args.doc:
        write_doc(text, report, curves)
    to_stderr(f"quality: {time.perf_counter() - start:.1f} s")
    return 0


def write_doc(text: str, report, curves) -> None:
    """The tables between docs/quality.md's markers; the two PNGs beside it."""
    from mergekit_like.zoo.figures import accuracy_bars, trade_off_curves
    from mergekit_like.zoo.quality import mean

    rows = report.rows
    accuracy_bars([r.label for r in rows], [mean([r.test[t] for t in report.merged])
                                             for r in rows],
                  [mean([r.test[t] for t in report.tasks]) for r in rows], DOCS / BARS)
    trade_off_curves(curves, {k: pareto_front(v) for k, v in curves.items()}, DOCS / FRONTS)
    doc = DOCS / "quality.md"
    figures = f"![accuracy per method]({BARS})\n\n![RCP trade-off]({FRONTS})"
    replace_between(doc, START, END, f"{text}\n\n{figures}",
                    heading="## Latest run of scripts/quality.py --doc")
    to_stderr(f"wrote {doc}, {DOCS / BARS}, {DOCS / FRONTS}")


if __name__ == "__main__":
    sys.exit(main())
