"""Double backward through the returned statistics and in gradient-penalty
training steps (gradgradcheck of every op is in test_gradcheck.py)."""

import pytest
import torch

import layernorm_ext
from layernorm_ext.op_db import op_info


def _input(shape):
    """Fresh float64 data of `shape` (the registry's samples' values)."""
    return op_info("layer_norm").make_sample(shape, "cpu", torch.float64).input


@pytest.mark.parametrize("op, outputs", [("layer_norm_forward", (1, 2)), ("rms_norm_forward", (1,))])
def test_gradients_through_returned_statistics(op, outputs):
    x = _input((4, 7)).requires_grad_()
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


def test_batch_norm_gradients_through_returned_statistics():
    x = _input((5, 3, 4)).requires_grad_()
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
