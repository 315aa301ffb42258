"""Sample inputs for the row-norm tests (LayerNorm, RMSNorm), in the style of
torch's OpInfo sample_inputs: each sample is the arguments of one call.
"""

import dataclasses
import itertools

import torch

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# (input shape, number of normalized trailing dims)
SHAPES = (
    ((4, 7), 1),
    ((1, 1), 1),
    ((3, 1), 1),
    ((0, 8), 1),
    ((2, 0, 5), 1),
    ((5, 13), 1),
    ((2, 3, 4, 5), 2),
    ((6, 2, 3, 5), 3),
    ((3, 1000), 1),
    ((2, 4096), 1),
    ((2, 65537), 1),
    ((37, 129), 1),
)

# Tolerance of a result against the float64 reference, by dtype: a few units
# of the dtype's rounding, relative to the outputs' unit scale.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 3e-3,
}


@dataclasses.dataclass
class Sample:
    input: torch.Tensor
    normalized_shape: tuple
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    def __repr__(self):
        def describe(t):
            return None if t is None else f"{tuple(t.shape)}:{t.dtype}:{'c' if t.is_contiguous() else 'nc'}"

        return (
            f"Sample(input={describe(self.input)}, normalized_shape={self.normalized_shape}, "
            f"weight={describe(self.weight)}, bias={describe(self.bias)})"
        )


def make_input(shape, dtype, contiguous=True, scale=3.0, shift=1.0):
    """Random input of `shape`; non-contiguous ones are a transposed view of the same values."""
    if contiguous or len(shape) < 2:
        return torch.randn(shape, dtype=torch.float64).mul(scale).add(shift).to(dtype)
    flipped = list(reversed(shape))
    base = torch.randn(flipped, dtype=torch.float64).mul(scale).add(shift).to(dtype)
    out = base.permute(*reversed(range(len(shape))))
    assert out.shape == torch.Size(shape) and (out.numel() <= 1 or not out.is_contiguous() or min(shape) <= 1)
    return out


def sample_inputs(dtypes=DTYPES, shapes=SHAPES, with_bias=True, param_dtype=None, requires_grad=False):
    """Every combination of dtype, shape, affine options and input layout."""
    affine_options = [(True, True), (True, False), (False, False)]
    if with_bias:
        affine_options.append((False, True))
    else:
        affine_options = [(w, False) for w, _ in affine_options[:1] + affine_options[2:]]
    for dtype, (shape, ndims), (has_weight, has_bias), contiguous in itertools.product(
        dtypes, shapes, affine_options, (True, False)
    ):
        normalized_shape = tuple(shape[len(shape) - ndims :])
        pdtype = param_dtype or dtype
        x = make_input(shape, dtype, contiguous).requires_grad_(requires_grad)
        weight = (
            torch.randn(normalized_shape, dtype=torch.float64).to(pdtype).requires_grad_(requires_grad)
            if has_weight
            else None
        )
        bias = (
            torch.randn(normalized_shape, dtype=torch.float64).to(pdtype).requires_grad_(requires_grad)
            if has_bias
            else None
        )
        yield Sample(x, normalized_shape, weight, bias)


def upcast(t):
    """A float64 leaf copy of t (None stays None), keeping requires_grad."""
    if t is None:
        return None
    return t.detach().double().requires_grad_(t.requires_grad)
