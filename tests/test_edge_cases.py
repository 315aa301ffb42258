"""Odd but valid input, concurrency and resources (row-wise norms)."""

import gc
import resource
import threading

import pytest
import torch
import torch.nn.functional as F

import layernorm_ext
from layernorm_ext.op_db import op_info

ROW_NORMS = [pytest.param(op_info(name), id=name) for name in ("layer_norm", "rms_norm")]


@pytest.mark.parametrize("norm", ROW_NORMS)
def test_nan_and_inf_stay_in_their_row(norm):
    ours = norm.op
    x = torch.randn(6, 33, requires_grad=True)
    with torch.no_grad():
        x[1, 5] = float("nan")
        x[4, 0] = float("inf")
    out = ours(x, (33,))
    bad_rows = {1, 4}
    for r in range(6):
        assert torch.isfinite(out[r]).all() == (r not in bad_rows), f"row {r}"
    (grad_x,) = torch.autograd.grad(out, x, torch.randn_like(out))
    for r in range(6):
        assert torch.isfinite(grad_x[r]).all() == (r not in bad_rows), f"grad row {r}"


@pytest.mark.parametrize("norm", ROW_NORMS)
def test_huge_row(norm):
    ours, ref = norm.op, norm.ref
    x = torch.randn(2, 1 << 20)
    torch.testing.assert_close(ours(x, (1 << 20,)).double(), ref(x.double(), (1 << 20,)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", ROW_NORMS)
def test_half_input_whose_squares_overflow_half(norm):
    ours, ref = norm.op, norm.ref
    x = (torch.randn(4, 64, dtype=torch.float64) * 3000).half()
    assert torch.isinf(x.float().square().half()).any()
    out = ours(x, (64,))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref(x.double(), (64,)), atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("norm", ROW_NORMS)
def test_expanded_input_and_gradient(norm):
    ours, ref = norm.op, norm.ref
    base = torch.randn(1, 3, 16, dtype=torch.float64)
    x = base.expand(4, 3, 16).requires_grad_()
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(1, 1, 16, dtype=torch.float64).expand(4, 3, 16)
    out, expected = ours(x, (16,), w), ref(x, (16,), w)
    torch.testing.assert_close(out, expected)
    for g, r in zip(torch.autograd.grad(out, (x, w), grad), torch.autograd.grad(expected, (x, w), grad)):
        torch.testing.assert_close(g, r)


@pytest.mark.slow
def test_tensor_past_two_to_the_31_elements():
    """64-bit indexing: rows past element 2^31 are normalized like the first ones."""
    cols = 1 << 16
    rows = (1 << 15) + 3  # 2^31 + 3 * 2^16 elements
    x = torch.empty(rows, cols, dtype=torch.bfloat16)
    for start in range(0, rows, 4096):  # fill in slices: no float64 copy of the whole
        x[start : start + 4096] = torch.randn(min(4096, rows - start), cols).to(torch.bfloat16)
    out = layernorm_ext.layer_norm(x, (cols,))
    assert x.numel() > 2**31
    for r in (0, rows // 2, rows - 2, rows - 1):
        torch.testing.assert_close(out[r].double(), F.layer_norm(x[r].double(), (cols,)), atol=2e-2, rtol=2e-2)
    del x, out
    gc.collect()


@pytest.mark.parametrize("norm", ROW_NORMS)
def test_many_python_threads_at_once(norm):
    ours = norm.op
    inputs = [torch.randn(64, 257) for _ in range(16)]
    expected = [ours(x, (257,)) for x in inputs]
    results = [None] * len(inputs)

    def work(i):
        for _ in range(5):
            results[i] = ours(inputs[i], (257,))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("norm", ROW_NORMS)
def test_thread_count_changes_between_calls_change_no_bits(norm):
    ours = norm.op
    x = torch.randn(300, 1000, requires_grad=True)
    w = torch.randn(1000, requires_grad=True)
    grad = torch.randn(300, 1000)
    results = []
    for threads in (2, 1, 2, 1):
        torch.set_num_threads(threads)
        out = ours(x, (1000,), w)
        results.append([out.detach(), *torch.autograd.grad(out, (x, w), grad)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_repeated_calls_do_not_leak():
    x = torch.randn(64, 512, requires_grad=True)
    w = torch.randn(512, requires_grad=True)

    def step():
        out = layernorm_ext.layer_norm(x, (512,), w)
        out.sum().backward()
        layernorm_ext.rms_norm(x.detach(), (512,), w.detach())

    for _ in range(500):
        step()
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(10_000):
        step()
    gc.collect()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # 10^4 calls allocating ~0.5 MB each: a leak would grow the peak by gigabytes.
    assert after - before < 50_000, f"max RSS grew by {after - before} kB"


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_nan_stays_in_its_channel(channels_last):
    x = torch.randn(4, 5, 3, 3)
    x[2, 1, 0, 2] = float("nan")
    x[0, 3, 1, 1] = float("inf")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    running_mean, running_var = torch.zeros(5), torch.ones(5)
    out = layernorm_ext.batch_norm(x, running_mean, running_var, torch.randn(5), torch.randn(5), training=True)
    bad = {1, 3}
    for c in range(5):
        assert torch.isfinite(out[:, c]).all() == (c not in bad), f"channel {c}"
        assert torch.isfinite(running_mean[c]) == (c not in bad), f"running_mean {c}"
    (grad_x,) = torch.autograd.grad(out, x, torch.randn_like(out))
    for c in range(5):
        assert torch.isfinite(grad_x[:, c]).all() == (c not in bad), f"grad channel {c}"
