"""Rich tables the CLI prints on stdout (merge plan, model summary, evaluation results)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from mergekit_like.console import out_console


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def print_plan(plan, out: Path, options) -> None:
    from mergekit_like.engine.write import plan_files

    shards = [s for group in plan_files(plan, options.out_shard_bytes).values() for s in group]
    table = Table(title=f"merge plan: {plan.recipe.merge_method} → {out}  (dry run, nothing written)")
    table.add_column("input")
    table.add_column("role")
    table.add_column("tensors", justify="right")
    table.add_column("files", justify="right")
    table.add_column("bytes", justify="right")
    for pos, (inp, header) in enumerate(zip(plan.inputs, plan.headers)):
        role = "base" if inp.is_base else "model"
        if inp.where:
            role += f" of slice {inp.where[1]}"
        if pos == plan.reference_pos:
            role += " (reference)"
        files = len({t.file for t in header.values()})
        table.add_row(inp.ref.display, role, str(len(header)), str(files),
                      fmt_bytes(sum(t.nbytes for t in header.values())))
    out_console.print(table)
    for line in plan.layer_map:
        out_console.print(line, markup=False, highlight=False)
    merged = sum(1 for j in plan.jobs if j.merge)
    out_console.print(f"output tensors: {len(plan.outputs)} ({merged} merged, "
                      f"{len(plan.jobs) - merged} copied from the reference)")
    out_console.print(f"output shards: {len(shards)}  ({', '.join(s.filename for s in shards[:3])}"
                      f"{' …' if len(shards) > 3 else ''})")
    out_console.print(f"bytes to read: {fmt_bytes(plan.read_bytes)}")
    hub = [s for s in plan.sources if hasattr(s, "download_bytes")]
    if hub:
        out_console.print(f"to download from the Hub: {fmt_bytes(sum(s.download_bytes() for s in hub))}"
                          " (shards not in the cache)")
    out_console.print(f"output size: {fmt_bytes(sum(s.file_size for s in shards))}")
    out_console.print(f"device: {options.device}   compute dtype: {str(plan.compute_dtype)[6:]}")
    out_console.print("peak memory estimate: "
                      f"{fmt_bytes(plan.peak_memory_estimate(options.block_elems) + 350 * 10**6)}"
                      " (host, incl. ~350 MB for Python and torch)")
    for note in plan.notes:
        out_console.print(note, markup=False, highlight=False)


def print_summary(model: str, summary, list_tensors: bool) -> None:
    files = Table(title=f"{model}")
    files.add_column("file")
    files.add_column("tensors", justify="right")
    files.add_column("bytes", justify="right")
    for name, (count, nbytes) in summary.files.items():
        files.add_row(name, str(count), fmt_bytes(nbytes))
    out_console.print(files)
    if list_tensors:
        t = Table()
        for col in ("tensor", "shape", "dtype", "file"):
            t.add_column(col)
        for info in summary.tensors:
            t.add_row(info.name, str(list(info.shape)), info.dtype, info.file)
        out_console.print(t)
    dtypes = ", ".join(f"{k} ({v})" for k, v in summary.dtypes.items())
    out_console.print(f"tensors: {len(summary.tensors)}   parameters: {summary.total_params:,}   "
                      f"size: {fmt_bytes(summary.total_bytes)}   dtypes: {dtypes}"
                      + (f"   layers: {summary.num_layers}" if summary.num_layers else ""))


def print_perplexity(model: Path, n_examples: int, result) -> None:
    table = Table(title=f"{model}: perplexity on {n_examples} example(s)")
    for col in ("tokens", "loss", "perplexity", "mean entropy"):
        table.add_column(col, justify="right")
    table.add_row(str(result.tokens), f"{result.loss:.4f}", f"{result.perplexity:.4f}",
                  f"{result.entropy:.4f}")
    out_console.print(table)


def print_accuracy(model: Path, examples: list, scores: dict[str, float]) -> None:
    from mergekit_like.runtime.evaluate import AVERAGE, NO_TASK

    counts: dict[str, int] = {}
    for ex in examples:
        counts[ex.task or NO_TASK] = counts.get(ex.task or NO_TASK, 0) + 1
    table = Table(title=f"{model}: greedy exact-match accuracy")
    table.add_column("task")
    table.add_column("examples", justify="right")
    table.add_column("accuracy", justify="right")
    for name, value in scores.items():
        if name == AVERAGE:
            table.add_section()
            table.add_row(name, str(len(examples)), f"{value:.4f}")
        else:
            table.add_row(name, str(counts[name]), f"{value:.4f}")
    out_console.print(table)
