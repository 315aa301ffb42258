"""The CPU kernels give the same bits for any torch.set_num_threads, on data
whose statistics blocks take the two-pass variance: sparse post-ReLU
activations, where the first value of a block (the shift of its one-sweep
sums) lies far from the mean. Each result is also checked against a float64
reference."""

import pytest
import torch
import torch.nn.functional as F

import layernorm_ext
from layernorm_ext.op_db import DTYPES, TOLERANCES

THREAD_COUNTS = (1, 2, 3, 8)  # 8 on fewer cores still splits the work 8 ways

# (shape, memory format): many channels (tasks own channel groups, whose
# number follows the thread count), few channels (tasks own blocks of one
# channel with 8 threads, channel groups with 1), channels-last rows.
BATCH_NORM_CASES = (
    ((32, 64, 28, 28), torch.contiguous_format),
    ((16, 6, 40, 40), torch.contiguous_format),
    ((32, 64, 28, 28), torch.channels_last),
    ((8, 3, 60, 60), torch.channels_last),
)


def _post_relu(shape, dtype, density):
    """relu(randn) kept with probability `density`, the rest zeros."""
    x = torch.relu(torch.randn(shape, dtype=torch.float64))
    return (x * (torch.rand(shape, dtype=torch.float64) < density)).to(dtype)


def _sparse_channels(shape, dtype):
    """Post-ReLU data where every 16th channel (from channel 1) is mostly zeros
    with a few positives and starts each sample's plane with a large value:
    its first statistics block takes the second sweep, its neighbours' do
    not, so a channel whose choice hung on the channels swept with it (a
    number that follows the thread count) would show."""
    x = _post_relu(shape, torch.float64, 0.5)
    sparse = slice(1, shape[1], 16)
    x[:, sparse] = _post_relu(x[:, sparse].shape, torch.float64, 0.02) * 4
    x[:, sparse, 0, 0] = 40.0
    return x.to(dtype)


def _under_each_thread_count(compute):
    """compute()'s tensors under each of THREAD_COUNTS, checked bit-identical;
    returns the first."""
    results = []
    for threads in THREAD_COUNTS:
        torch.set_num_threads(threads)
        results.append(compute())
    for threads, result in zip(THREAD_COUNTS[1:], results[1:]):
        for name, first, other in zip(results[0], results[0].values(), result.values()):
            assert torch.equal(first, other), f"{name}: 1 thread vs {threads} threads"
    return results[0]


def _batch_norm_training_step(x, weight, bias, grad, batch_norm):
    x = x.detach().requires_grad_()
    running_mean = torch.zeros(x.shape[1], dtype=weight.dtype)
    running_var = torch.ones(x.shape[1], dtype=weight.dtype)
    out = batch_norm(x, running_mean, running_var, weight, bias, training=True)
    dx, dweight, dbias = torch.autograd.grad(out, [x, weight, bias], grad)
    return {
        "output": out.detach(), "running_mean": running_mean, "running_var": running_var,
        "grad_input": dx, "grad_weight": dweight, "grad_bias": dbias,
    }


def _assert_close_to_float64(result, reference, dtype):
    for name, value in result.items():
        expected = reference[name]
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(
            value.double(), expected, rtol=TOLERANCES[dtype]["rtol"], atol=TOLERANCES[dtype]["atol"] * scale,
            msg=lambda m: f"{name}: {m}",
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,memory_format", BATCH_NORM_CASES, ids=str)
def test_batch_norm_training_is_thread_count_independent(shape, memory_format, dtype):
    x = _sparse_channels(shape, dtype).contiguous(memory_format=memory_format)
    weight = torch.randn(shape[1], dtype=dtype).requires_grad_()
    bias = torch.randn(shape[1], dtype=dtype).requires_grad_()
    grad = torch.randn(shape, dtype=dtype).contiguous(memory_format=memory_format)
    result = _under_each_thread_count(
        lambda: _batch_norm_training_step(x, weight, bias, grad, layernorm_ext.batch_norm)
    )
    assert result["output"].is_contiguous(memory_format=memory_format)
    reference = _batch_norm_training_step(
        x.double(), weight.detach().double().requires_grad_(),
        bias.detach().double().requires_grad_(), grad.double(), F.batch_norm,
    )
    _assert_close_to_float64(result, reference, dtype)


@pytest.mark.parametrize("memory_format", (torch.contiguous_format, torch.channels_last), ids=str)
def test_batch_norm_of_dense_post_relu_is_thread_count_independent(memory_format):
    # The case: relu(randn), where now and then a block's first value
    # is a draw far above its mean (about 0.4, variance 0.34); here channel
    # 5's first one is such a draw, at 3.5 standard normals.
    x = torch.relu(torch.randn(32, 64, 28, 28))
    x[0, 5, 0, 0] = 3.5
    x = x.contiguous(memory_format=memory_format)
    weight = torch.randn(64).requires_grad_()
    bias = torch.randn(64).requires_grad_()
    grad = torch.randn_like(x)
    _under_each_thread_count(
        lambda: _batch_norm_training_step(x, weight, bias, grad, layernorm_ext.batch_norm)
    )


def _row_norm_step(op, x, weight, bias, grad):
    x = x.detach().requires_grad_()
    params = [weight] if bias is None else [weight, bias]
    if op == "layer_norm":
        out = layernorm_ext.layer_norm(x, (x.shape[-1],), weight, bias)
    else:
        out = layernorm_ext.rms_norm(x, (x.shape[-1],), weight)
    grads = torch.autograd.grad(out, [x, *params], grad)
    return dict(zip(("output", "grad_input", "grad_weight", "grad_bias"), (out.detach(), *grads)))


def _row_norm_reference(op, x, weight, bias, grad):
    x = x.double().requires_grad_()
    params = [weight.detach().double().requires_grad_()]
    if bias is not None:
        params.append(bias.detach().double().requires_grad_())
    if op == "layer_norm":
        out = F.layer_norm(x, (x.shape[-1],), *params)
    else:
        out = F.rms_norm(x, (x.shape[-1],), params[0])
    grads = torch.autograd.grad(out, [x, *params], grad.double())
    return dict(zip(("output", "grad_input", "grad_weight", "grad_bias"), (out.detach(), *grads)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ("layer_norm", "rms_norm"))
def test_row_norms_are_thread_count_independent(op, dtype):
    # Rows of post-ReLU activations, every other one sparse with a large
    # first value (LayerNorm's shift): those take the second sweep.
    rows, cols = 512, 768
    x = _post_relu((rows, cols), torch.float64, 0.5)
    x[::2] = _post_relu((rows // 2, cols), torch.float64, 0.02) * 4
    x[::2, 0] = 40.0
    x = x.to(dtype)
    weight = torch.randn(cols, dtype=dtype).requires_grad_()
    bias = torch.randn(cols, dtype=dtype).requires_grad_() if op == "layer_norm" else None
    grad = torch.randn(rows, cols, dtype=dtype)
    result = _under_each_thread_count(lambda: _row_norm_step(op, x, weight, bias, grad))
    _assert_close_to_float64(result, _row_norm_reference(op, x, weight, bias, grad), dtype)
