"""The registry of layernorm_ext's ops, in the style of torch's OpInfo: for each
public functional, its torch reference, sample inputs, tolerances against the
float64 reference, and how to call its forward and backward ops in an op
namespace (``torch.ops.layernorm_ext`` or another one defining the same
schemas, such as the tests' CPU executor of the CUDA kernels).

The tests, ``python -m layernorm_ext`` and the benchmarks take their op list
from :data:`OP_DB`. Not imported by ``import layernorm_ext``.
"""

import dataclasses
import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

import layernorm_ext

# Every floating-point dtype the ops take.
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
EPS = 1e-5
MOMENTUM = 0.1


# Our result against the float64 reference, by dtype, for every op: a few
# roundings of the dtype relative to the outputs' unit scale (float32
# accumulation for the 16-bit types).
TOLERANCES = {
    dtype: {"atol": tol, "rtol": tol}
    for dtype, tol in (
        (torch.float64, 1e-12),
        (torch.float32, 2e-5),
        (torch.bfloat16, 1.6e-2),
        (torch.float16, 2e-3),
    )
}


@dataclasses.dataclass(frozen=True)
class SampleInput:
    """The arguments of one call of an OpInfo's ``op``: ``op(*args, **kwargs)``."""

    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)

    @property
    def input(self) -> torch.Tensor:
        return self.args[0]

    def tensors(self) -> list:
        """The tensor arguments, in order (absent ones left out)."""
        return [a for a in (*self.args, *self.kwargs.values()) if isinstance(a, torch.Tensor)]

    def map_tensors(self, fn) -> "SampleInput":
        """A sample with fn(t) for each tensor argument t."""

        def apply(value):
            return fn(value) if isinstance(value, torch.Tensor) else value

        return SampleInput(tuple(apply(a) for a in self.args),
                           {k: apply(v) for k, v in self.kwargs.items()})

    def with_tensors(self, tensors) -> "SampleInput":
        """This sample with its tensor arguments replaced, in the order of
        tensors(): ``lambda *t: op(*sample.with_tensors(t).args)`` is the op
        as a function of the tensors (for gradcheck, torch.func)."""
        replacements = iter(tensors)
        replaced = self.map_tensors(lambda _: next(replacements))
        assert next(replacements, None) is None, "more tensors than the sample has"
        return replaced

    def clone(self) -> "SampleInput":
        """Independent leaf copies with the same strides and requires_grad (the
        ops may update running statistics in place)."""
        return self.map_tensors(
            lambda t: t.detach().clone(memory_format=torch.preserve_format)
            .requires_grad_(t.requires_grad))

    def upcast(self) -> "SampleInput":
        """float64 leaf copies (strides kept where dense), keeping requires_grad:
        the reference's arguments."""
        return self.map_tensors(lambda t: t.detach().double().requires_grad_(t.requires_grad))

    def __repr__(self):
        def describe(value):
            if not isinstance(value, torch.Tensor):
                return repr(value)
            if value.is_contiguous():
                layout = ""
            elif value.dim() in (4, 5) and value.is_contiguous(
                memory_format=torch.channels_last if value.dim() == 4 else torch.channels_last_3d
            ):
                layout = ":channels_last"
            else:
                layout = f":strides{value.stride()}"
            dtype = str(value.dtype).removeprefix("torch.")
            return f"{tuple(value.shape)}:{dtype}{layout}"

        parts = [describe(a) for a in self.args] + [f"{k}={describe(v)}" for k, v in self.kwargs.items()]
        return f"SampleInput({', '.join(parts)})"


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """One op: ``op`` (our public functional), ``ref`` (torch's, same signature
    and outputs, run on float64 upcasts), its samples and tolerances, and its
    forward / backward ops.

    ``sample_inputs(device, dtype, requires_grad=False, **options)`` yields
    SampleInputs (the options: the docstrings of ``sample_inputs`` in
    _row_norm_sampler and of _batch_norm_sample_inputs); ``make_sample(shape,
    device, dtype, ...)`` makes one, of an input shape of the caller's choice.
    ``call_forward(ns, sample)`` calls ``ns.<forward_op>`` with the sample's
    arguments; ``call_backward(ns, sample, forward_outputs, grad_output,
    output_mask)`` calls ``ns.<backward_op>`` with what the forward op
    returned; ``backward_outputs`` names the backward op's outputs (the
    length of its output_mask).
    """

    name: str
    op: Callable
    ref: Callable
    sample_inputs: Callable
    make_sample: Callable
    tolerances: dict
    forward_op: str
    backward_op: str
    call_forward: Callable
    call_backward: Callable
    backward_outputs: tuple

    def forward_arguments(self, sample) -> tuple:
        """The arguments call_forward passes the forward op (for opcheck, or a
        call of one of its kernels)."""
        return self.call_forward(_ArgumentsOf(), sample)

    def backward_arguments(self, sample, forward_outputs, grad_output, output_mask) -> tuple:
        """The arguments call_backward passes the backward op."""
        return self.call_backward(_ArgumentsOf(), sample, forward_outputs, grad_output, output_mask)


class _ArgumentsOf:
    """An op namespace whose ops return their arguments."""

    def __getattr__(self, name):
        return lambda *args: args


# --------------------------------------------------------------------------- sample data


def _random(shape, dtype, device, generator, scale=3.0, shift=1.0):
    return (torch.randn(shape, dtype=torch.float64, generator=generator) * scale + shift).to(
        device=device, dtype=dtype)


def make_tensor(shape, dtype, device="cpu", layout="contiguous", generator=None, **values):
    """Fresh random data of `shape` (mean 1 and std 3 unless `shift` and
    `scale` say otherwise) in `layout`: "contiguous"; "transposed" (a
    permuted view with the dims reversed); "strided" (every other element of
    the last dim); "channels_last" (channels_last / channels_last_3d)."""
    shape = tuple(shape)
    if layout == "contiguous" or (layout == "transposed" and len(shape) < 2):
        return _random(shape, dtype, device, generator, **values)
    if layout == "transposed":
        base = _random(shape[::-1], dtype, device, generator, **values)
        return base.permute(*reversed(range(len(shape))))
    if layout == "strided":
        return _random((*shape[:-1], 2 * shape[-1]), dtype, device, generator, **values)[..., ::2]
    if layout == "channels_last":
        memory_format = {4: torch.channels_last, 5: torch.channels_last_3d}[len(shape)]
        return _random(shape, dtype, device, generator, **values).contiguous(memory_format=memory_format)
    raise ValueError(f"unknown layout {layout!r}")


def _parameter(shape, dtype, device, generator, requires_grad):
    return _random(shape, dtype, device, generator, scale=1.0, shift=0.0).requires_grad_(requires_grad)


# Which of (weight, bias) an "affine" option gives.
AFFINE = {"both": (True, True), "weight": (True, False), "bias": (False, True), "none": (False, False)}


def _affine_options(affine, has_bias):
    """The affine option names (keys of AFFINE) a sample set covers: every one
    the op takes when None; True: all its parameters; False: none; else the
    names given."""
    if affine is None:
        return [a for a in AFFINE if has_bias or not AFFINE[a][1]]
    if affine is True:
        return ["both" if has_bias else "weight"]
    if affine is False:
        return ["none"]
    return list(affine)


# --------------------------------------------------------------------------- row norms


# (input shape, number of normalized trailing dims): one of each size class,
# 1, odd, primes, a row of 2^16 + 1, several normalized dims, empty batches.
ROW_SHAPES = (
    ((4, 7), 1),
    ((1, 1), 1),
    ((3, 1), 1),
    ((5, 13), 1),
    ((2, 3, 4, 5), 2),
    ((6, 2, 3, 5), 3),
    ((3, 1000), 1),
    ((2, 4096), 1),
    ((2, 65537), 1),
    ((37, 129), 1),
)
EMPTY_ROW_SHAPES = (((0, 8), 1), ((2, 0, 5), 1))
# For slow checks (gradcheck, opcheck): a row, several normalized dims, rows
# of one element, a batch dim of one.
SMALL_ROW_SHAPES = (((3, 5), 1), ((2, 3, 4), 2), ((2, 1), 1), ((4, 1, 3), 1))
ROW_LAYOUTS = ("contiguous", "transposed", "strided")


def _rows_for(cols):
    """Rows of a `cols=` sample: several (odd) for short rows, two for long ones."""
    return 5 if cols <= 4099 else 2


def _row_norm_sampler(has_bias, residual):
    """make_sample and sample_inputs of a row norm (with a bias argument, with a
    residual argument)."""

    def make_sample(shape, device, dtype, requires_grad=False, *, norm_dims=1, layout="contiguous",
                    param_dtype=None, affine=True, eps=EPS, generator=None):
        normalized_shape = tuple(shape[len(shape) - norm_dims:])
        (affine,) = _affine_options(affine, has_bias) if isinstance(affine, bool) else (affine,)
        with_weight, with_bias = AFFINE[affine]
        if with_bias and not has_bias:
            raise ValueError(f"affine={affine!r}: this op takes no bias")
        x = make_tensor(shape, dtype, device, layout, generator).requires_grad_(requires_grad)
        args = [x]
        if residual:
            args.append(make_tensor(shape, dtype, device, layout, generator).requires_grad_(requires_grad))
        pdtype = param_dtype or dtype
        params = [_parameter(normalized_shape, pdtype, device, generator, requires_grad) if wanted else None
                  for wanted in (with_weight, with_bias)[: 2 if has_bias else 1]]
        return SampleInput((*args, normalized_shape, *params, eps))

    def sample_inputs(device, dtype, requires_grad=False, *, cols=None, small=False,
                      layouts=ROW_LAYOUTS, param_dtype=None, affine=None, empty=True,
                      max_numel=None, generator=None):
        """Every combination of shape, affine option and layout.

        cols: rows of these lengths (normalized over the last dim) instead of
        ROW_SHAPES; small: SMALL_ROW_SHAPES instead; empty: with the
        zero-row shapes; max_numel: only shapes of at most this many
        elements; param_dtype: weight and bias dtype (None: the input's;
        float32 with a half/bfloat16 input); affine: see _affine_options."""
        if small:
            shapes = SMALL_ROW_SHAPES
        else:
            shapes = ROW_SHAPES if cols is None else tuple(((_rows_for(c), c), 1) for c in cols)
        if empty:
            shapes = EMPTY_ROW_SHAPES + shapes
        if max_numel is not None:
            shapes = tuple(s for s in shapes if math.prod(s[0]) <= max_numel)
        for (shape, norm_dims), option, layout in itertools.product(
            shapes, _affine_options(affine, has_bias), layouts
        ):
            yield make_sample(shape, device, dtype, requires_grad, norm_dims=norm_dims, layout=layout,
                              param_dtype=param_dtype, affine=option, generator=generator)

    return make_sample, sample_inputs


def _fused_add_reference(norm):
    """torch's equivalent of a fused residual add + norm: ``(norm(x + r), x + r)``.
    On float64 upcasts, ``sum_dtype`` (the op's input dtype) rounds the sum as
    torch's add in that dtype does before the norm; gradients pass through the
    rounding unchanged."""

    def reference(input, residual, *norm_args, sum_dtype=None, **norm_kwargs):
        total = input + residual
        if sum_dtype is not None:
            total = total + (total.to(sum_dtype).to(total.dtype) - total).detach()
        return norm(total, *norm_args, **norm_kwargs), total

    return reference


def _layer_norm_forward(ns, sample):
    x, normalized_shape, weight, bias, eps = sample.args
    return ns.layer_norm_forward(x, list(normalized_shape), weight, bias, eps)


def _layer_norm_backward(ns, sample, forward_outputs, grad_output, output_mask):
    x, normalized_shape, weight, bias, _ = sample.args
    _, mean, rstd = forward_outputs
    return ns.layer_norm_backward(grad_output, x, list(normalized_shape), mean, rstd, weight, bias,
                                  list(output_mask))


def _rms_norm_forward(ns, sample):
    x, normalized_shape, weight, eps = sample.args
    return ns.rms_norm_forward(x, list(normalized_shape), weight, eps)


def _rms_norm_backward(ns, sample, forward_outputs, grad_output, output_mask):
    x, normalized_shape, weight, _ = sample.args
    _, rstd = forward_outputs
    return ns.rms_norm_backward(grad_output, x, list(normalized_shape), rstd, weight, list(output_mask))


def _fused_add_layer_norm_forward(ns, sample):
    x, residual, normalized_shape, weight, bias, eps = sample.args
    return ns.fused_add_layer_norm_forward(x, residual, list(normalized_shape), weight, bias, eps)


def _fused_add_layer_norm_backward(ns, sample, forward_outputs, grad_output, output_mask):
    """layer_norm_backward on the sum, as the fused op's autograd calls it."""
    _, _, normalized_shape, weight, bias, _ = sample.args
    _, total, mean, rstd = forward_outputs
    return ns.layer_norm_backward(grad_output, total, list(normalized_shape), mean, rstd, weight, bias,
                                  list(output_mask))


def _fused_add_rms_norm_forward(ns, sample):
    x, residual, normalized_shape, weight, eps = sample.args
    return ns.fused_add_rms_norm_forward(x, residual, list(normalized_shape), weight, eps)


def _fused_add_rms_norm_backward(ns, sample, forward_outputs, grad_output, output_mask):
    _, _, normalized_shape, weight, _ = sample.args
    _, total, rstd = forward_outputs
    return ns.rms_norm_backward(grad_output, total, list(normalized_shape), rstd, weight,
                                list(output_mask))


# --------------------------------------------------------------------------- batch norm


# Input shapes of 2 to 5 dims: one channel, a batch of one, primes, several
# row blocks of a 2-D input.
BATCH_NORM_SHAPES = (
    (6, 5),
    (7, 3, 11),
    (4, 6, 5, 7),
    (3, 4, 3, 5, 2),
    (5, 1, 9),
    (1, 3, 13),
    (2, 13, 17, 3),
    (37, 1),
    (300, 130),
    (2, 67, 3, 5),
)
# (0,): a 1-D input, which has no channels (torch accepts only an empty one).
EMPTY_BATCH_NORM_SHAPES = ((0, 3, 4), (2, 3, 0), (0, 3), (0,))
# For slow checks (gradcheck, opcheck): 2-D to 5-D, a few values per channel.
SMALL_BATCH_NORM_SHAPES = ((5, 3), (3, 2, 5), (2, 3, 3, 2), (2, 2, 2, 3, 2))
BATCH_NORM_LAYOUTS = ("contiguous", "channels_last", "strided")


def _batch_norm_make_sample(shape, device, dtype, requires_grad=False, *, layout="contiguous",
                            param_dtype=None, affine=True, training=True, running_stats=True,
                            momentum=MOMENTUM, eps=EPS, generator=None):
    """One batch_norm sample: input of mean 0.5 and std 2; positive weight;
    running statistics (in the parameters' dtype) unless running_stats=False."""
    channels = shape[1] if len(shape) > 1 else 0
    pdtype = param_dtype or dtype
    x = make_tensor(shape, dtype, device, layout, generator, scale=2.0, shift=0.5)
    (affine,) = _affine_options(affine, True) if isinstance(affine, bool) else (affine,)
    with_weight, with_bias = AFFINE[affine]
    weight = (_random((channels,), pdtype, device, generator, scale=0.5, shift=1.0)
              .requires_grad_(requires_grad) if with_weight else None)
    bias = _parameter((channels,), pdtype, device, generator, requires_grad) if with_bias else None
    running_mean = running_var = None
    if running_stats:
        running_mean = _random((channels,), pdtype, device, generator, scale=1.0, shift=0.0)
        running_var = _random((channels,), torch.float64, device, generator, scale=1.0,
                              shift=0.0).abs_().add_(0.5).to(pdtype)
    return SampleInput((x.requires_grad_(requires_grad), running_mean, running_var, weight, bias,
                        training, momentum, eps))


def _batch_norm_sample_inputs(device, dtype, requires_grad=False, *, small=False,
                              layouts=BATCH_NORM_LAYOUTS, param_dtype=None, affine=None,
                              training=(True, False), empty=True, max_numel=None, generator=None):
    """Every shape in each layout it has (channels_last: 4-D and 5-D), every
    affine option and mode, with running statistics.

    small: SMALL_BATCH_NORM_SHAPES instead of BATCH_NORM_SHAPES; training:
    the modes (True, False or both); empty: with the empty batches;
    max_numel: only shapes of at most this many elements."""
    if isinstance(training, bool):
        training = (training,)
    shapes = (EMPTY_BATCH_NORM_SHAPES if empty else ()) + (
        SMALL_BATCH_NORM_SHAPES if small else BATCH_NORM_SHAPES)
    if max_numel is not None:
        shapes = tuple(s for s in shapes if math.prod(s) <= max_numel)
    for shape, layout, option, mode in itertools.product(
        shapes, layouts, _affine_options(affine, True), training
    ):
        if layout == "channels_last" and len(shape) not in (4, 5):
            continue
        if len(shape) == 1 and option != "none":
            continue  # torch's batch_norm (the reference) rejects [0]-shaped parameters
        if mode and len(shape) > 1 and math.prod(shape) // max(1, shape[1]) == 1:
            continue  # training needs more than one value per channel
        yield _batch_norm_make_sample(shape, device, dtype, requires_grad, layout=layout,
                                      param_dtype=param_dtype, affine=option, training=mode,
                                      generator=generator)


def _batch_norm_forward(ns, sample):
    x, running_mean, running_var, weight, bias, training, momentum, eps = sample.args
    return ns.batch_norm_forward(x, weight, bias, running_mean, running_var, training, momentum, eps)


def _batch_norm_backward(ns, sample, forward_outputs, grad_output, output_mask):
    x, _, _, weight, bias, training, _, _ = sample.args
    _, save_mean, save_rstd, _, _ = forward_outputs
    return ns.batch_norm_backward(grad_output, x, weight, bias, save_mean, save_rstd, training,
                                  list(output_mask))


# --------------------------------------------------------------------------- the table


def _row_norm_info(name, op, ref, forward, backward, forward_op, backward_op, has_bias, residual):
    make_sample, sample_inputs = _row_norm_sampler(has_bias, residual)
    return OpInfo(
        name=name, op=op, ref=ref, sample_inputs=sample_inputs, make_sample=make_sample,
        tolerances=TOLERANCES, forward_op=forward_op, backward_op=backward_op,
        call_forward=forward, call_backward=backward,
        backward_outputs=("input", "weight", "bias") if has_bias else ("input", "weight"),
    )


OP_DB = [
    _row_norm_info("layer_norm", layernorm_ext.layer_norm, F.layer_norm, _layer_norm_forward,
                   _layer_norm_backward, "layer_norm_forward", "layer_norm_backward",
                   has_bias=True, residual=False),
    _row_norm_info("rms_norm", layernorm_ext.rms_norm, F.rms_norm, _rms_norm_forward,
                   _rms_norm_backward, "rms_norm_forward", "rms_norm_backward",
                   has_bias=False, residual=False),
    OpInfo(
        name="batch_norm", op=layernorm_ext.batch_norm, ref=F.batch_norm,
        sample_inputs=_batch_norm_sample_inputs, make_sample=_batch_norm_make_sample,
        tolerances=TOLERANCES, forward_op="batch_norm_forward",
        backward_op="batch_norm_backward", call_forward=_batch_norm_forward,
        call_backward=_batch_norm_backward, backward_outputs=("input", "weight", "bias"),
    ),
    _row_norm_info("fused_add_layer_norm", layernorm_ext.fused_add_layer_norm,
                   _fused_add_reference(F.layer_norm), _fused_add_layer_norm_forward,
                   _fused_add_layer_norm_backward, "fused_add_layer_norm_forward",
                   "layer_norm_backward", has_bias=True, residual=True),
    _row_norm_info("fused_add_rms_norm", layernorm_ext.fused_add_rms_norm,
                   _fused_add_reference(F.rms_norm), _fused_add_rms_norm_forward,
                   _fused_add_rms_norm_backward, "fused_add_rms_norm_forward", "rms_norm_backward",
                   has_bias=False, residual=True),
]

_BY_NAME = {info.name: info for info in OP_DB}


def op_info(name: str) -> OpInfo:
    """The OpInfo of the op called `name` (KeyError names the known ones)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no op {name!r} in OP_DB; known: {sorted(_BY_NAME)}") from None

