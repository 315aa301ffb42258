"""LayerNorm / RMSNorm modules as drop-ins for torch.nn's, and under torch.compile."""

import pytest
import torch

import layernorm_ext

MODULES = [
    (layernorm_ext.LayerNorm, torch.nn.LayerNorm, [{}, {"bias": False}, {"elementwise_affine": False}, {"eps": 1e-3}]),
    (layernorm_ext.RMSNorm, torch.nn.RMSNorm, [{}, {"elementwise_affine": False}, {"eps": 1e-3}]),
]
CASES = [(ours, theirs, kwargs) for ours, theirs, options in MODULES for kwargs in options]


def _id(value):
    return value.__name__ if isinstance(value, type) else str(value)


@pytest.mark.parametrize("ours, theirs, kwargs", CASES, ids=_id)
@pytest.mark.parametrize("normalized_shape", [8, (3, 8)], ids=str)
def test_module_is_a_drop_in(ours, theirs, kwargs, normalized_shape):
    mine, ref = ours(normalized_shape, **kwargs), theirs(normalized_shape, **kwargs)
    assert isinstance(mine, theirs)
    assert repr(mine).split("(", 1)[1] == repr(ref).split("(", 1)[1]
    assert list(mine.state_dict()) == list(ref.state_dict())
    for (name, p), (ref_name, ref_p) in zip(mine.named_parameters(), ref.named_parameters()):
        assert name == ref_name and torch.equal(p, ref_p)

    # Load each other's checkpoints, after making the parameters non-trivial.
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 8, dtype=torch.float64).float()
    torch.testing.assert_close(mine(x), ref(x), atol=2e-5, rtol=2e-5)
    back = theirs(normalized_shape, **kwargs)
    back.load_state_dict(mine.state_dict())
    torch.testing.assert_close(back(x), mine(x), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("ours, theirs, kwargs", CASES[:1] + CASES[4:5], ids=_id)
def test_module_dtype_and_device_arguments(ours, theirs, kwargs):
    mine = ours(6, dtype=torch.float64, device="cpu", **kwargs)
    assert mine.weight.dtype == torch.float64 and mine.weight.device.type == "cpu"
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mine, (x,))


class PreNormBlock(torch.nn.Module):
    """A GPT-style pre-norm transformer block built from our LayerNorm."""

    def __init__(self, dim, heads, norm):
        super().__init__()
        self.ln_1, self.ln_2 = norm(dim), norm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


@pytest.mark.parametrize("norm", [layernorm_ext.LayerNorm, layernorm_ext.RMSNorm], ids=_id)
def test_compile_fullgraph_forward_and_backward(norm):
    torch.manual_seed(0)
    model = torch.nn.Sequential(PreNormBlock(32, 4, norm), norm(32))
    x = torch.randn(2, 5, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager = model(x)
    eager.square().mean().backward()
    torch.testing.assert_close(out, eager)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=lambda m: f"{n}: {m}")
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0


def test_compile_inductor_with_dynamic_batch():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), layernorm_ext.LayerNorm(16))
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for rows in (3, 5, 9):
        x = torch.randn(rows, 16)
        torch.testing.assert_close(compiled(x), model(x))
