"""Every op of op_db.OP_DB, through its public functional on each backend's
device, against torch's reference on float64 upcasts of the same sample:
outputs (values, dtype, shape, strides), the arguments it updates in place
(BatchNorm's running statistics) and the gradients of every tensor argument,
in every dtype, over the whole sample set (every size class, layout, affine
option, zero rows)."""

import pytest
import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

from backends import backend_params
from layernorm_ext.op_db import DTYPES, OP_DB

OPS = [pytest.param(info, id=info.name) for info in OP_DB]
BACKENDS = backend_params("cpu", "cuda")


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


def assert_close_to_reference(actual, reference, tolerance, what, scale=1.0):
    """actual (any dtype) against the float64 reference, atol scaled by `scale`."""
    torch.testing.assert_close(
        actual.double(), reference, atol=tolerance["atol"] * scale, rtol=tolerance["rtol"],
        msg=lambda m: f"{what}: {m}",
    )


def run_forward(info, sample):
    """Our outputs and the reference's, and the sample's and the upcast's
    arguments after the calls."""
    ours_sample, reference_sample = sample.clone(), sample.upcast()
    ours = _outputs(info.op(*ours_sample.args, **ours_sample.kwargs))
    reference_kwargs = dict(reference_sample.kwargs)
    if info.name.startswith("fused_add_"):
        # The fused sum is rounded to the input's dtype, as torch's add is:
        # in bfloat16 that alone moves a normalized output by up to
        # 2^-9 * |x + r| / std.
        reference_kwargs["sum_dtype"] = sample.input.dtype
    reference = _outputs(info.ref(*reference_sample.args, **reference_kwargs))
    return ours, reference, ours_sample, reference_sample


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info", OPS)
def test_forward_matches_float64_reference(info, dtype, backend):
    tolerance = info.tolerances[dtype]
    for sample in info.sample_inputs(backend.device, dtype):
        ours, reference, ours_sample, reference_sample = run_forward(info, sample)
        assert len(ours) == len(reference)
        for index, (out, ref) in enumerate(zip(ours, reference)):
            what = f"{info.name} output {index} {sample}"
            assert out.dtype == dtype and out.shape == ref.shape and out.device == sample.input.device, what
            # The normalized output is laid out as torch's (whose upcast input
            # keeps the input's strides where dense). The fused ops' sum is
            # contiguous, where torch's add would keep a permuted layout.
            if index == 0 and is_non_overlapping_and_dense(sample.input):
                assert out.stride() == ref.stride() or out.numel() <= 1, what
            assert_close_to_reference(out, ref, tolerance, what)
        # Arguments updated in place (running statistics) keep their dtype.
        for index, (arg, ref) in enumerate(zip(ours_sample.tensors(), reference_sample.tensors())):
            what = f"{info.name} argument {index} after the call {sample}"
            assert arg.dtype == sample.tensors()[index].dtype, what
            # Rounded to the argument's dtype first, as the op stores it.
            assert_close_to_reference(arg, ref.to(arg.dtype).double(), tolerance, what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info", OPS)
def test_backward_matches_float64_reference(info, dtype, backend):
    tolerance = info.tolerances[dtype]
    for sample in info.sample_inputs(backend.device, dtype, requires_grad=True):
        ours, reference, ours_sample, reference_sample = run_forward(info, sample)
        grad_outputs = [torch.randn(ref.shape, dtype=torch.float64).to(out.dtype).to(out.device)
                        for out, ref in zip(ours, reference)]
        leaves = [t for t in ours_sample.tensors() if t.requires_grad]
        reference_leaves = [t for t in reference_sample.tensors() if t.requires_grad]
        grads = torch.autograd.grad(ours, leaves, grad_outputs, allow_unused=True)
        reference_grads = torch.autograd.grad(
            reference, reference_leaves, [g.double() for g in grad_outputs], allow_unused=True)
        for index, (leaf, grad, ref) in enumerate(zip(leaves, grads, reference_grads)):
            what = f"{info.name} gradient of argument {index} {sample}"
            assert (grad is None) == (ref is None), what
            if grad is None:
                continue
            assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, what
            # Parameter gradients sum over rows (or a channel's values): the
            # tolerance grows with the square root of their number.
            summed = max(1.0, sample.input.numel() / max(1, leaf.numel()))
            scale = max(1.0, ref.abs().max().item() if ref.numel() else 1.0) * summed**0.5
            assert_close_to_reference(grad, ref, tolerance, what, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("info", OPS)
def test_reduced_input_with_float32_parameters_matches_float64_reference(info, dtype, backend):
    """torch's kernels take float32 weight and bias (and BatchNorm's running
    statistics) with a half/bfloat16 input: so do ours, with float32 gradients
    for them."""
    tolerance = info.tolerances[dtype]
    for sample in info.sample_inputs(backend.device, dtype, requires_grad=True,
                                     param_dtype=torch.float32, empty=False, max_numel=4096):
        ours, reference, ours_sample, _ = run_forward(info, sample)
        for out, ref in zip(ours, reference):
            assert out.dtype == dtype
            assert_close_to_reference(out, ref, tolerance, f"{info.name} {sample}")
        params = [t for t in ours_sample.tensors()[1:] if t.requires_grad and t.dtype != dtype]
        if params:
            grads = torch.autograd.grad(ours[0].float().sum(), params)
            assert all(g.dtype == torch.float32 for g in grads)
