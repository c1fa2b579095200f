"""fedquant.buffers: fresh tensors, numpy-allocated (huge pages) on the CPU, torch elsewhere."""

import pytest
import torch

from fedquant import buffers

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8,
          torch.int64, torch.int16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_and_zeros_give_writable_cpu_tensors_of_the_dtype(dtype):
    n = (1 << 21) + 3  # past numpy's 4 MiB huge-page threshold for most dtypes
    for t in (buffers.empty(n, dtype), buffers.zeros(n, dtype)):
        assert t.shape == (n,) and t.dtype == dtype and t.device.type == "cpu"
        assert t.is_contiguous()
        t[-1] = 1
        assert float(t[-1]) == 1.0



@pytest.mark.parametrize("dtype", DTYPES)
def test_zeros_are_zero_even_in_reused_memory(dtype):
    # small blocks come back from malloc's free lists still holding old bytes: an
    # `empty` passed off as `zeros` would show the 7s written just before
    for _ in range(20):
        dirty = buffers.empty(1000, dtype)
        dirty.fill_(7)
        del dirty
        assert not bool(buffers.zeros(1000, dtype).bool().any())


def test_empty_like_takes_dtype_device_and_an_optional_count():
    x = torch.ones(10, dtype=torch.float16)
    assert buffers.empty_like(x).shape == (10,)
    y = buffers.empty_like(x, 4)
    assert y.shape == (4,) and y.dtype == torch.float16


def test_other_devices_are_allocated_by_torch():
    # the meta device stands in for CUDA: no numpy memory may be handed to it
    for t in (buffers.empty(8, torch.float32, "meta"), buffers.zeros(8, torch.float64, "meta")):
        assert t.device.type == "meta" and t.shape == (8,)
