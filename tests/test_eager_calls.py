"""The functional wrappers' two ways into the forward ops (layernorm_ext/_eager.py):
the extension's direct calls in eager mode, torch.ops under torch.compile and
for __torch_function__ overrides. Both must give the same results, and the
overrides must still see the op."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import layernorm_ext
from layernorm_ext import _eager, _loader

DIRECT = _loader.ensure_loaded().eager
OPS = torch.ops.layernorm_ext


def _calls():
    """(name, wrapper call, the same through torch.ops, its tensors) for each
    forward op; each call returns a tuple of tensors."""
    g = torch.Generator().manual_seed(31)
    x = torch.randn(5, 37, generator=g)
    residual = torch.randn(5, 37, generator=g)
    w, b = torch.randn(37, generator=g), torch.randn(37, generator=g)
    images = torch.randn(3, 4, 5, 6, generator=g)
    cw, cb = torch.randn(4, generator=g), torch.randn(4, generator=g)
    rm, rv = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5
    return [
        ("layer_norm", lambda: (layernorm_ext.layer_norm(x, (37,), w, b, 1e-5),),
         lambda: OPS.layer_norm_forward(x, [37], w, b, 1e-5)[:1], (x,)),
        ("rms_norm", lambda: (layernorm_ext.rms_norm(x, (37,), w, 1e-6),),
         lambda: OPS.rms_norm_forward(x, [37], w, 1e-6)[:1], (x,)),
        ("batch_norm", lambda: (layernorm_ext.batch_norm(images, rm.clone(), rv.clone(), cw, cb, True),),
         lambda: OPS.batch_norm_forward(images, cw, cb, rm.clone(), rv.clone(), True, 0.1, 1e-5)[:1],
         (images,)),
        ("fused_add_layer_norm", lambda: layernorm_ext.fused_add_layer_norm(x, residual, (37,), w, b),
         lambda: OPS.fused_add_layer_norm_forward(x, residual, [37], w, b, 1e-5)[:2], (x,)),
        ("fused_add_rms_norm", lambda: layernorm_ext.fused_add_rms_norm(x, residual, (37,), w, 1e-6),
         lambda: OPS.fused_add_rms_norm_forward(x, residual, [37], w, 1e-6)[:2], (x,)),
    ]


CALLS = _calls()


def test_eager_calls_take_the_direct_path():
    x = torch.randn(2, 3)
    assert _eager.direct_calls(x, None, torch.nn.Parameter(torch.ones(3))) is DIRECT
    assert _eager.direct_calls(x.as_subclass(_Recorded)) is None
    with _Recorder():
        assert _eager.direct_calls(x) is None


@pytest.mark.parametrize("name,wrapper,through_ops,tensors", CALLS, ids=[c[0] for c in CALLS])
def test_direct_calls_give_the_bits_of_torch_ops(name, wrapper, through_ops, tensors):
    for got, expected in zip(wrapper(), through_ops(), strict=True):
        assert torch.equal(got, expected)


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class _Recorded(torch.Tensor):
    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("name,wrapper,through_ops,tensors", CALLS, ids=[c[0] for c in CALLS])
def test_torch_function_overrides_still_see_the_op(name, wrapper, through_ops, tensors):
    op = f"layernorm_ext.{name}_forward"
    with _Recorder() as mode:
        wrapper()
    assert op in mode.seen
    # A tensor subclass with its own __torch_function__ as the input.
    _Recorded.seen = []
    sub = tensors[0].as_subclass(_Recorded)
    call_with_sub = {
        "layer_norm": lambda: layernorm_ext.layer_norm(sub, (37,)),
        "rms_norm": lambda: layernorm_ext.rms_norm(sub, (37,)),
        "batch_norm": lambda: layernorm_ext.batch_norm(sub, None, None, training=True),
        "fused_add_layer_norm": lambda: layernorm_ext.fused_add_layer_norm(sub, sub.clone(), (37,)),
        "fused_add_rms_norm": lambda: layernorm_ext.fused_add_rms_norm(sub, sub.clone(), (37,)),
    }[name]
    call_with_sub()
    assert op in _Recorded.seen


def test_a_non_tensor_input_is_a_type_error_naming_the_op():
    with pytest.raises(TypeError, match=r"layer_norm\(\)"):
        layernorm_ext.layer_norm("not a tensor", (8,))
