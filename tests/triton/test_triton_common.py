"""Host helpers every Triton kernel module shares (bonekern/backends/triton/common.py): when a launch needs int64
offsets, and which ``input_precision`` fp32 dots take."""

from __future__ import annotations

import torch

from bonekern.backends.triton import common


def test_needs_int64_decides_by_largest_offset():
    """int64 offsets exactly when the largest element offset sum((size - 1) * stride) passes 2^31 - 1."""
    small = torch.empty(4, 8, device="meta")
    big_rows = torch.empty(2**16, 2**15 + 1, device="meta")  # (2^16 - 1) * (2^15 + 1) + 2^15 > 2^31 - 1
    strided = torch.empty(2, 4, device="meta").as_strided((2, 4), (2**31, 1))
    assert not common.needs_int64(small, None)
    assert common.needs_int64(big_rows) and common.needs_int64(small, strided)
    assert not common.needs_int64(torch.empty(2**15, 2**16, device="meta"))  # last offset 2^31 - 1 fits
    fits = torch.empty_strided((2, 2**30), (2**30, 1), device="meta")  # last offset 2^31 - 1
    too_far = torch.empty_strided((3, 2**30), (2**30, 1), device="meta")
    row_strided = torch.empty_strided((4, 8), (2**29, 1), device="meta")  # 3 * 2^29 + 7 < 2^31
    wide_stride = torch.empty_strided((5, 8), (2**29, 1), device="meta")  # 4 * 2^29 + 7 > 2^31 - 1
    assert not common.needs_int64(fits, None, row_strided)
    assert common.needs_int64(fits, too_far)
    assert common.needs_int64(wide_stride)


def test_fp32_dot_precision_follows_torch_tf32_flag():
    """ "tf32" exactly when torch would use TF32 for an fp32 matmul on the device; "ieee" for fp64 accumulation."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert common.fp32_dot_precision(cuda) == "ieee" and common.fp32_dot_precision(cpu) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert common.fp32_dot_precision(cuda) == "tf32" and common.fp32_dot_precision(cpu) == "ieee"
        assert common.fp32_dot_precision(cuda, torch.float32) == "tf32"
        assert common.fp32_dot_precision(cuda, torch.float64) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
