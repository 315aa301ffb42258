"""torch.library.opcheck of every forward and backward op of op_db.OP_DB, on
each backend: schema, fake (meta) kernels against the real outputs (shapes,
dtypes, strides), autograd registration and torch.compile (AOT) tracing, on
small samples in every layout, with and without parameters, and empty batches."""

import itertools

import pytest
import torch

from backends import backend_params
from layernorm_ext.op_db import OP_DB

OPS = [pytest.param(info, id=info.name) for info in OP_DB]
BACKENDS = backend_params("cpu", "cuda")
# (input dtype, parameter dtype): float32 parameters with a bfloat16 input, as torch allows.
DTYPES = [(torch.float32, None), (torch.bfloat16, torch.float32)]


def _samples(info, backend, dtype, param_dtype):
    """The small samples with every parameter in each layout, and without
    parameters in the contiguous layout (each opcheck compiles: a fraction of
    a second)."""
    options = dict(requires_grad=True, small=True, param_dtype=param_dtype)
    yield from info.sample_inputs(backend.device, dtype, affine=True, **options)
    yield from info.sample_inputs(backend.device, dtype, affine=False, layouts=("contiguous",), **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, param_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info", OPS)
def test_forward_op(info, dtype, param_dtype, backend):
    op = getattr(backend.ops(), info.forward_op)
    for sample in _samples(info, backend, dtype, param_dtype):
        torch.library.opcheck(op, info.forward_arguments(sample))


def _output_masks(count):
    """Every gradient, the first alone, the others alone: cycled over the samples."""
    return itertools.cycle([[True] * count, [True] + [False] * (count - 1), [False] + [True] * (count - 1)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, param_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info", OPS)
def test_backward_op(info, dtype, param_dtype, backend):
    ops = backend.ops()
    op = getattr(ops, info.backward_op)
    masks = _output_masks(len(info.backward_outputs))
    for sample in _samples(info, backend, dtype, param_dtype):
        sample = sample.map_tensors(torch.Tensor.detach)
        forward_outputs = info.call_forward(ops, sample)
        grad_output = torch.randn_like(forward_outputs[0])
        torch.library.opcheck(
            op, info.backward_arguments(sample, forward_outputs, grad_output, next(masks)))
