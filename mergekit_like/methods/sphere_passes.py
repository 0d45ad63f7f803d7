"""The two passes the hypersphere adapters (nuslerp, multislerp, karcher) share: pieces of the
inputs as task vectors (x − base, when a base is given) in the compute dtype, their float64
Gram matrix (``ops.gram``), and the final blend out = [base +] Σ c_j·(x_j [− base]) cast once
to the output dtype."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from mergekit_like.kernels.tiling import Scratch, pieces, row_elems
from mergekit_like.methods.base import TensorTask
from mergekit_like.ops.gram import exact_gram, row_gram, weighted_sum

Coeff = float | torch.Tensor


def vector_pieces(task: TensorTask, xs: Sequence[torch.Tensor], base: torch.Tensor | None,
                  scratch: Scratch) -> Iterator[tuple[int, list[torch.Tensor], torch.Tensor | None]]:
    """``(flat offset, [flat piece of x_j − base, or of x_j], base piece or None)`` in row order,
    in the compute dtype (read-only, valid until the next piece)."""
    tensors = list(xs) + ([base] if base is not None else [])
    for off, parts in pieces(task, tensors):
        if base is None:
            yield off, parts, None
            continue
        b = parts[-1]
        diffs = [torch.sub(x, b, out=scratch.get(("d", k), b.numel()))
                 for k, x in enumerate(parts[:-1])]
        yield off, diffs, b


def gram_pass(task: TensorTask, xs: Sequence[torch.Tensor],
              base: torch.Tensor | None) -> torch.Tensor:
    """(N, N) float64 Gram matrix of the x_j (or of x_j − base), exact over rows."""
    row = row_elems(task.shape)
    scratch = Scratch(task.compute_dtype, task.device)
    parts = []
    for _, vs, _ in vector_pieces(task, xs, base, scratch):
        parts.append(row_gram([v.to(torch.float64) for v in vs], row).cpu())
    if not parts:
        n = len(xs)
        return torch.zeros((n, n), dtype=torch.float64)
    return exact_gram(parts)


def blend_pass(task: TensorTask, xs: Sequence[torch.Tensor], base: torch.Tensor | None,
               coeffs: Callable[[int, int], list[Coeff]],
               view: Callable[[torch.Tensor], torch.Tensor] = lambda v: v) -> torch.Tensor:
    """The output tensor: [base +] Σ_j c_j·(x_j [− base]) per piece, in the compute dtype, cast
    once to the output dtype. ``coeffs(offset, n)``: the coefficients for the piece of n
    elements at flat ``offset``, broadcastable against ``view(piece)``."""
    scratch = Scratch(task.compute_dtype, task.device)
    out = task.empty_output()
    flat_out = out.view(-1)
    for off, vs, b in vector_pieces(task, xs, base, scratch):
        n = vs[0].numel()
        acc = view(scratch.get("acc", n))
        res = weighted_sum([view(v) for v in vs], coeffs(off, n), acc, view(scratch.get("tmp", n)))
        res = res.view(-1)
        if b is not None:
            res.add_(b)
        flat_out[off:off + n].copy_(res)
    return out
