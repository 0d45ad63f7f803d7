"""kernels/tiling.py's BufferPool: buffers lent for one tensor and reused by the next."""

from __future__ import annotations

import torch

from mergekit_like.kernels.tiling import BufferPool


def test_lent_buffers_are_distinct_until_released():
    pool = BufferPool()
    a, b = pool.take(100, torch.bool), pool.take(100, torch.bool)
    assert a.numel() == b.numel() == 100 and a.dtype == torch.bool
    assert a.data_ptr() != b.data_ptr()
    pool.release()
    c, d = pool.take(100, torch.bool), pool.take(50, torch.bool)
    assert {c.data_ptr(), d.data_ptr()} == {a.data_ptr(), b.data_ptr()}
    assert d.numel() == 50


def test_smallest_fitting_buffer_and_dtype():
    pool = BufferPool()
    big, small = pool.take(1000, torch.bool), pool.take(10, torch.bool)
    pool.release()
    assert pool.take(8, torch.bool).data_ptr() == small.data_ptr()
    assert pool.take(600, torch.bool).data_ptr() == big.data_ptr()
    other = pool.take(8, torch.float32)                         # no free float32 buffer: new
    assert other.dtype == torch.float32 and other.data_ptr() not in (big.data_ptr(),
                                                                     small.data_ptr())
    larger = pool.take(2000, torch.bool)                        # none fits: new
    assert larger.numel() == 2000 and larger.data_ptr() != big.data_ptr()


def test_release_keeps_only_what_was_lent_since_the_last():
    pool = BufferPool()
    first = [pool.take(n, torch.bool) for n in (100, 200, 300)]
    pool.release()
    kept = pool.take(150, torch.bool)                           # the 200 one
    pool.release()
    assert [b.data_ptr() for b in pool._free] == [kept.data_ptr()]
    assert kept.data_ptr() == first[1].data_ptr()
    assert not pool._lent


def test_a_much_larger_buffer_is_not_kept_for_small_requests():
    """After a large tensor, small requests get buffers of their own and the large ones go at
    the next release: the pool does not hold the embeddings' masks through the layers."""
    pool = BufferPool()
    big = [pool.take(10_000, torch.bool) for _ in range(3)]
    pool.release()
    small = [pool.take(4_000, torch.bool) for _ in range(3)]
    assert not {b.data_ptr() for b in small} & {b.data_ptr() for b in big}
    pool.release()
    assert sorted(b.numel() for b in pool._free) == [4_000] * 3
    kept = {b.data_ptr() for b in pool._free}
    assert pool.take(5_001, torch.bool).data_ptr() not in kept  # 4 000 < 5 001: a new one
