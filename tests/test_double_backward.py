"""Double backward: the backward ops of every norm have their own derivatives."""

import pytest
import torch

import layernorm_ext
from samples import make_input

CASES = [
    ("layer_norm", (5, 6), 1, "both"),
    ("layer_norm", (5, 6), 1, "none"),
    ("layer_norm", (5, 6), 1, "bias"),
    ("layer_norm", (2, 3, 4), 2, "weight"),
    ("layer_norm", (3, 1), 1, "both"),
    ("rms_norm", (5, 6), 1, "weight"),
    ("rms_norm", (5, 6), 1, "none"),
    ("rms_norm", (2, 3, 4), 2, "weight"),
]


def make_fn(name, normalized_shape, affine):
    if name == "layer_norm":
        return lambda x, w, b: layernorm_ext.layer_norm(x, normalized_shape, w, b)
    return lambda x, w, b: layernorm_ext.rms_norm(x, normalized_shape, w)


@pytest.mark.parametrize("name, shape, ndims, affine", CASES, ids=str)
def test_gradgradcheck(name, shape, ndims, affine):
    normalized_shape = shape[len(shape) - ndims :]
    x = make_input(shape, torch.float64).requires_grad_()
    w = torch.randn(normalized_shape, dtype=torch.float64, requires_grad=True) if affine in ("both", "weight") else None
    b = torch.randn(normalized_shape, dtype=torch.float64, requires_grad=True) if affine in ("both", "bias") else None
    fn = make_fn(name, normalized_shape, affine)
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("op, outputs", [("layer_norm_forward", (1, 2)), ("rms_norm_forward", (1,))])
def test_gradients_through_returned_statistics(op, outputs):
    x = make_input((4, 7), torch.float64).requires_grad_()
    w = torch.randn(7, dtype=torch.float64)
    extra = (w, None) if op == "layer_norm_forward" else (w,)
    fn = lambda x: tuple(getattr(torch.ops.layernorm_ext, op)(x, [7], *extra, 1e-5)[i] for i in outputs)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("ours, theirs", [(layernorm_ext.LayerNorm, torch.nn.LayerNorm),
                                          (layernorm_ext.RMSNorm, torch.nn.RMSNorm)])
def test_gradient_penalty_step_matches_torch(ours, theirs):
    """A WGAN-GP critic step differentiates through the norm's backward."""

    def critic(norm):
        torch.manual_seed(3)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), norm(16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()

    def penalty_grads(model, x):
        x = x.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        penalty = (grad_x.norm(2, dim=1) - 1).pow(2).mean()
        penalty.backward()
        return [p.grad for p in model.parameters()]

    x = torch.randn(6, 8, dtype=torch.float64)
    for mine, ref in zip(penalty_grads(critic(ours), x), penalty_grads(critic(theirs), x)):
        torch.testing.assert_close(mine, ref)


BATCH_NORM_CASES = [
    ((4, 3), True, True),
    ((4, 3), False, True),
    ((3, 2, 5), True, False),
    ((2, 3, 2, 2), True, True),
    ((2, 3, 2, 2), False, True),
    ((2, 2, 1, 2, 3), True, True),
]


@pytest.mark.parametrize(
    "shape, training, affine, channels_last",
    [(*case, False) for case in BATCH_NORM_CASES]
    + [(*case, True) for case in BATCH_NORM_CASES if len(case[0]) in (4, 5)],
    ids=str,
)
def test_batch_norm_gradgradcheck(shape, training, affine, channels_last):
    channels = shape[1]
    x = make_input(shape, torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    x.requires_grad_()
    w = torch.randn(channels, dtype=torch.float64, requires_grad=True) if affine else None
    b = torch.randn(channels, dtype=torch.float64, requires_grad=True) if affine else None
    running_mean = None if training else torch.randn(channels, dtype=torch.float64)
    running_var = None if training else torch.rand(channels, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        return layernorm_ext.batch_norm(x, running_mean, running_var, w, b, training=training)

    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_batch_norm_gradients_through_returned_statistics():
    x = make_input((5, 3, 4), torch.float64).requires_grad_()
    fn = lambda x: torch.ops.layernorm_ext.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)[1:3]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_batch_norm_gradient_penalty_step_matches_torch():
    def critic(norm):
        torch.manual_seed(4)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), norm(16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()

    def penalty_grads(model, x):
        x = x.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        (grad_x.norm(2, dim=1) - 1).pow(2).mean().backward()
        return [p.grad for p in model.parameters()]

    x = torch.randn(6, 8, dtype=torch.float64)
    for mine, ref in zip(penalty_grads(critic(layernorm_ext.BatchNorm1d), x),
                         penalty_grads(critic(torch.nn.BatchNorm1d), x)):
        torch.testing.assert_close(mine, ref)
