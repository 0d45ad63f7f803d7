"""merge: one job's inputs moved to the compute device and handed to the method as one
``TensorTask``; the method computes block by block and casts once to the planned dtype."""

from __future__ import annotations

import torch

from mergekit_like.engine.options import MergeOptions
from mergekit_like.engine.jobs import MergePlan, TensorJob
from mergekit_like.engine.read import JobInputs
from mergekit_like.engine.vocab_plan import align_inputs
from mergekit_like.methods.base import TensorTask


def threads_for(plan: MergePlan, options: MergeOptions) -> tuple[int, int]:
    """torch threads and operator workers for the plan's method (see ``Method.io_bound`` and
    ``Method.span_parallel``); on CUDA every core stays with torch."""
    threads = torch.get_num_threads()
    compute, workers = threads, 1
    if options.device.type == "cpu":
        if plan.method.io_bound and threads > 1:
            compute = threads - 1            # a core for the reader thread
        if plan.method.span_parallel and compute > 1:
            compute, workers = 1, compute    # the operator's own threads, one span each
    return compute, workers


def merge_job(plan: MergePlan, job: TensorJob, inputs: JobInputs, options: MergeOptions, *,
              workers: int = 1, memo: dict | None = None,
              reports: dict[str, dict] | None = None) -> dict[str, torch.Tensor]:
    """Outputs of one job on the compute device, each in its planned dtype. ``workers``: the
    threads a span-parallel operator may use; ``memo``: what the points of one grid pass share
    for this tensor (``TensorTask.memo``); the operator's ``TensorTask.report``, if any, goes
    to ``reports[job.name]``."""
    if not job.merge:
        return {job.name: inputs.base}
    if job.align:
        inputs = align_inputs(plan, job, inputs)
    device = options.device
    task = TensorTask(
        name=job.name,
        shape=tuple(job.info.shape),
        out_dtype=job.outputs[0].dtype,
        compute_dtype=plan.compute_dtype,
        load_dtype=plan.recipe.dtype,
        base=None if inputs.base is None else inputs.base.to(device, non_blocking=True),
        inputs=[t.to(device, non_blocking=True) for t in inputs.inputs],
        input_indices=[plan.inputs[pos].index for pos in job.participants],
        model_params=job.model_params,
        params=job.params,
        seed=plan.recipe.seed,
        t=job.t,
        input_extra=[plan.inputs[pos].extra for pos in job.participants],
        side={label: t.to(device, non_blocking=True) for label, t in inputs.side.items()},
        block_elems=options.block_elems,
        device=device,
        workers=workers,
        inputs_finite=not options.allow_nonfinite,
        memo=memo,
    )
    outputs = plan.method.merge(task)
    if task.report is not None and reports is not None:
        reports[job.name] = task.report
    for spec in job.outputs:
        got = outputs[spec.key]
        if got.dtype != spec.dtype or tuple(got.shape) != tuple(spec.shape):
            raise RuntimeError(f"{plan.method.spec.name} produced {got.dtype} {list(got.shape)} "
                               f"for '{spec.name}', planned {spec.dtype} {list(spec.shape)}")
    return outputs
