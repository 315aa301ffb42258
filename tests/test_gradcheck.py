"""gradcheck and gradgradcheck (double backward: the backward ops have their
own derivatives) of every op of op_db.OP_DB through its public functional,
on each backend, over the small float64 samples: every affine option,
layout, BatchNorm mode, and for the fused ops both outputs."""

import pytest
import torch

from backends import backend_params
from layernorm_ext.op_db import OP_DB

OPS = [pytest.param(info, id=info.name) for info in OP_DB]
BACKENDS = backend_params("cpu", "cuda")


def _as_function(info, sample):
    """The op as a function of the sample's tensors (those that require grad
    are checked; BatchNorm's running statistics do not)."""
    return lambda *tensors: info.op(*sample.with_tensors(tensors).args)


def _samples(info, backend):
    return info.sample_inputs(backend.device, torch.float64, requires_grad=True, small=True, empty=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", OPS)
def test_gradcheck(info, backend):
    for sample in _samples(info, backend):
        assert torch.autograd.gradcheck(_as_function(info, sample), tuple(sample.tensors())), sample


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", OPS)
def test_gradgradcheck(info, backend):
    for sample in _samples(info, backend):
        assert torch.autograd.gradgradcheck(_as_function(info, sample), tuple(sample.tensors())), sample
