"""LayerNorm: ``layer_norm`` (as torch.nn.functional.layer_norm) and ``LayerNorm``
(a drop-in torch.nn.LayerNorm), with the fake kernels of the
``layernorm_ext::layer_norm_forward`` / ``layer_norm_backward`` ops. Both
ops' autograd (reverse and forward mode, any order) is C++
(csrc/autograd_*_ops.cpp); their vmap rules are in _vmap.py.
"""

import torch

from ._eager import direct_calls, is_scripting
from ._shapes import (
    as_normalized_shape,
    batch_shape,
    check_same_device,
    empty_unless,
    stats_dtype,
)

_ops = torch.ops.layernorm_ext


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer normalization over the trailing ``normalized_shape`` dims of ``input``.

    Same contract as :func:`torch.nn.functional.layer_norm`: each row is
    normalized by its mean and *biased* variance, ``eps`` is added inside the
    square root, then scaled by ``weight`` and shifted by ``bias`` (both
    optional, of shape ``normalized_shape``). float16/bfloat16 inputs are
    computed in float32; their weight and bias may be float32.
    """
    normalized_shape = as_normalized_shape(normalized_shape)
    direct = direct_calls(input, weight, bias)
    if direct is not None:
        return direct.layer_norm(input, normalized_shape, weight, bias, float(eps))
    output, _, _ = _ops.layer_norm_forward(input, normalized_shape, weight, bias, float(eps))
    return output


# torch.fx.symbolic_trace records calls to layer_norm (from LayerNorm.forward)
# as calls, as it records torch.nn.functional.layer_norm.
torch.fx.wrap("layer_norm")


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for :class:`torch.nn.LayerNorm`, computed by layernorm_ext's kernels.

    Same arguments, defaults, parameters (``weight``, ``bias``), initialisation,
    ``state_dict`` keys and ``repr``; it is a subclass of torch.nn.LayerNorm, so
    code that checks ``isinstance(m, torch.nn.LayerNorm)`` keeps working.
    torch.jit.script compiles it to a call of the
    ``layernorm_ext::layer_norm_forward`` op.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if is_scripting():
            return torch.ops.layernorm_ext.layer_norm_forward(
                input, self.normalized_shape, self.weight, self.bias, self.eps
            )[0]
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


@torch.library.register_fake("layernorm_ext::layer_norm_forward")
def _layer_norm_forward_fake(input, normalized_shape, weight, bias, eps):
    check_same_device("layer_norm", input, weight=weight, bias=bias)
    stats = batch_shape(input, normalized_shape)
    dtype = stats_dtype(input.dtype)
    return (
        input.new_empty(input.shape),
        input.new_empty(stats, dtype=dtype),
        input.new_empty(stats, dtype=dtype),
    )


@torch.library.register_fake("layernorm_ext::layer_norm_backward")
def _layer_norm_backward_fake(
    grad_output, input, normalized_shape, mean, rstd, weight, bias, output_mask
):
    check_same_device(
        "layer_norm_backward", input, weight=weight, bias=bias, grad_output=grad_output
    )
    weight_like = weight if weight is not None else input
    bias_like = bias if bias is not None else weight_like
    return (
        empty_unless(output_mask[0], input, input.shape),
        empty_unless(output_mask[1] and weight is not None, weight_like, normalized_shape),
        empty_unless(output_mask[2] and bias is not None, bias_like, normalized_shape),
    )
