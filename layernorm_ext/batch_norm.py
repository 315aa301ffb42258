"""BatchNorm: ``batch_norm`` (as torch.nn.functional.batch_norm) and
``BatchNorm1d`` / ``BatchNorm2d`` / ``BatchNorm3d`` (drop-ins for torch.nn's),
with the fake kernels of the ``layernorm_ext::batch_norm_forward`` /
``batch_norm_backward`` ops. Both ops' autograd (reverse and forward mode,
any order) is C++ (csrc/autograd_*_ops.cpp); their vmap rules are in _vmap.py.

The ops never mutate: ``batch_norm_forward`` returns the updated running
statistics and :func:`batch_norm` copies them into the buffers, after every
check has passed, so a call that raises leaves the buffers as they were.
Under torch.func transforms the copy is made at the buffers' own level of
transforms, as aten's native_batch_norm mutates them (see _at_level_of).
"""

from typing import List, Optional

import torch

from ._eager import direct_calls, is_scripting
from ._shapes import check_same_device, empty_unless, stats_dtype

_ops = torch.ops.layernorm_ext
_functorch = torch._C._functorch
_is_compiling = torch.compiler.is_compiling
_POPPABLE_TRANSFORMS = (
    _functorch.TransformType.Grad,
    _functorch.TransformType.Jvp,
    _functorch.TransformType.Vmap,
)


def batch_norm(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
):
    """Batch normalization of an ``(N, C, *)`` input, per channel.

    Same contract as :func:`torch.nn.functional.batch_norm`: in training the
    input is normalized with its own per-channel mean and *biased* variance
    (over N and the spatial dims), and ``running_mean`` / ``running_var``,
    when given, are updated in place to ``(1 - momentum) * running +
    momentum * batch`` (the variance with the *unbiased* batch variance); in
    eval the running statistics normalize. ``weight`` and ``bias`` (shape
    ``[C]``) are optional. float16/bfloat16 inputs are computed in float32;
    their weight, bias and running statistics may be float32. A
    channels-last input gives a channels-last output.
    """
    _check_eps(training, eps)
    args = (input, weight, bias, running_mean, running_var, training, float(momentum), float(eps))
    direct = direct_calls(input, weight, bias, running_mean, running_var)
    if direct is not None:
        output, new_mean, new_var = direct.batch_norm(*args)
    else:
        output, _, _, new_mean, new_var = _ops.batch_norm_forward(*args)
    if training and running_mean is not None:
        _copy_into(running_mean, new_mean)
        _copy_into(running_var, new_var)
    return output


def _check_eps(training: bool, eps: float) -> None:
    """torch's eps checks of batch_norm (also compiled into the modules'
    TorchScript forward)."""
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _copy_into(buffer, value):
    """buffer <- value, an updated running statistic: shape [C] into a buffer of
    any shape of C elements."""
    if buffer.dim() != 1:
        value = value.view_as(buffer)
    if _outside_transforms():
        _copy(buffer, value)
    else:
        _at_level_of(buffer, lambda unwrapped: _copy(buffer, unwrapped), value)


def _outside_transforms() -> bool:
    """No torch.func transform is running, or torch.compile traces the call
    (dynamo captures the transforms and the buffer mutation itself, and
    cannot trace functorch's level queries)."""
    return _functorch.peek_interpreter_stack() is None or _is_compiling()


def _copy(buffer, value):
    """The op's value does not require grad, so copy_ records nothing unless
    the buffer does; only then is torch.no_grad (which costs as much as the
    copy on a small buffer) needed."""
    if buffer.requires_grad:
        with torch.no_grad():
            buffer.copy_(value)
    else:
        buffer.copy_(value)


def _at_level_of(buffer, update, value=None):
    """update(value), a mutation of `buffer`, run with the torch.func
    transforms above the buffer's level popped off the stack and `value`
    unwrapped down to that level.

    Inside grad/vjp/jvp a running statistic captured from outside (or a
    module's counter) is a plain tensor while the op's results are wrapped
    at the transform's level, and functorch refuses an in-place op there on
    a captured tensor ("would mutate a captured Tensor"). aten's
    native_batch_norm mutates its buffers from inside the op, below the
    transforms (they unwrap its arguments level by level), and the update
    here does the same: the new statistics carry no gradient or tangent, so
    their values below the transforms are the ones to store. Buffers that
    are themselves transformed inputs (passed to grad, batched by vmap) are
    at the top level and are updated there. vmap levels above the buffer
    hold no batched value: the batching rule (_vmap.py) returns the new
    statistics of an unbatched buffer unbatched, or raises as torch's does."""
    level = _functorch.maybe_get_level(buffer)
    popped = []
    try:
        top = _functorch.peek_interpreter_stack()
        while top is not None and top.level() > level and top.key() in _POPPABLE_TRANSFORMS:
            if value is not None and _functorch.maybe_get_level(value) == top.level():
                value = _functorch.get_unwrapped(value)
            popped.append(_functorch.pop_dynamic_layer_stack())
            top = _functorch.peek_interpreter_stack()
        update(value)
    finally:
        for layer in reversed(popped):
            _functorch.push_dynamic_layer_stack(layer)


def _batch_norm_module_forward(self, input: torch.Tensor) -> torch.Tensor:
    """torch.nn's _BatchNorm.forward, except that the counter and the running
    statistics change only after the op has run (and so after every check)."""
    self._check_input_dim(input)
    # Batch statistics normalize in training, and in eval without buffers;
    # the buffers are passed when they are read (eval) or updated (tracking).
    use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
    pass_buffers = not self.training or self.track_running_stats
    return _module_batch_norm(
        input,
        self.running_mean if pass_buffers else None,
        self.running_var if pass_buffers else None,
        self.weight,
        self.bias,
        self.num_batches_tracked if self.training and self.track_running_stats else None,
        use_batch_stats,
        self.momentum,
        self.eps,
    )


def _module_batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
) -> torch.Tensor:
    """batch_norm for the modules: ``num_batches_tracked``, when given, counts
    the call (after it ran), and ``momentum=None`` then averages over the
    batches counted, this one included.

    A function of the module's tensors, for torch.fx.symbolic_trace, which
    records it as one call: traced, the modules' forward would read and
    increment the counter at trace time (fx does not trace buffers read from
    the module, only those passed to a call). TorchScript compiles it, with
    the op called through torch.ops (the direct calls are not scriptable)."""
    if momentum is None:
        factor = 0.0 if num_batches_tracked is None else 1.0 / (num_batches_tracked.item() + 1)
    else:
        factor = momentum
    if is_scripting():
        _check_eps(training, eps)
        output, _, _, new_mean, new_var = torch.ops.layernorm_ext.batch_norm_forward(
            input, weight, bias, running_mean, running_var, training, factor, eps
        )
        if training and running_mean is not None and running_var is not None:
            with torch.no_grad():
                running_mean.copy_(new_mean.view_as(running_mean))
                running_var.copy_(new_var.view_as(running_var))
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
    else:
        output = batch_norm(input, running_mean, running_var, weight, bias, training, factor, eps)
        if num_batches_tracked is not None:
            _count_batch(num_batches_tracked)
    return output


torch.fx.wrap("_module_batch_norm")


def _count_batch(num_batches_tracked: torch.Tensor) -> None:
    """num_batches_tracked += 1, at the counter's level of torch.func transforms
    (a counter captured by grad/jvp is counted as the running statistics are
    updated; torch.nn's add_ raises there)."""
    if _outside_transforms():
        num_batches_tracked.add_(1)
    else:
        _at_level_of(num_batches_tracked, lambda _: num_batches_tracked.add_(1))


def _check_input_dims(input: torch.Tensor, dims: List[int], expected: str) -> None:
    """torch.nn.BatchNorm1d/2d/3d's input check (the same ValueError), as a
    function: torch.fx.symbolic_trace records the call (a traced tensor's
    number of dims is unknown while tracing), TorchScript compiles it."""
    if input.dim() not in dims:
        raise ValueError("expected {} input (got {}D input)".format(expected, input.dim()))


torch.fx.wrap("_check_input_dims")


class BatchNorm1d(torch.nn.BatchNorm1d):
    """Drop-in for :class:`torch.nn.BatchNorm1d` (``(N, C)`` or ``(N, C, L)`` input),
    computed by layernorm_ext's kernels.

    A subclass of torch.nn.BatchNorm1d: same arguments, defaults, parameters
    and buffers (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``), ``state_dict`` keys both ways, input checks and
    ``repr``; ``momentum=None`` keeps a cumulative average. Unlike torch's, a
    call that raises leaves ``num_batches_tracked`` unchanged.
    """

    forward = _batch_norm_module_forward

    def _check_input_dim(self, input: torch.Tensor) -> None:
        _check_input_dims(input, [2, 3], "2D or 3D")


class BatchNorm2d(torch.nn.BatchNorm2d):
    """Drop-in for :class:`torch.nn.BatchNorm2d` (``(N, C, H, W)`` input), computed by
    layernorm_ext's kernels; see :class:`BatchNorm1d`. A ``torch.channels_last``
    input gives a channels-last output."""

    forward = _batch_norm_module_forward

    def _check_input_dim(self, input: torch.Tensor) -> None:
        _check_input_dims(input, [4], "4D")


class BatchNorm3d(torch.nn.BatchNorm3d):
    """Drop-in for :class:`torch.nn.BatchNorm3d` (``(N, C, D, H, W)`` input), computed
    by layernorm_ext's kernels; see :class:`BatchNorm1d`. A
    ``torch.channels_last_3d`` input gives a channels-last-3d output."""

    forward = _batch_norm_module_forward

    def _check_input_dim(self, input: torch.Tensor) -> None:
        _check_input_dims(input, [5], "5D")


def output_memory_format(input: torch.Tensor) -> torch.memory_format:
    """The memory format of the ops' outputs (and grad_input): the C++ kernels'
    batch_norm_memory_format rule, a 4-D channels_last or 5-D channels_last_3d input
    that is not also plain contiguous keeps its format; anything else gives a
    contiguous tensor."""
    if input.is_contiguous():
        return torch.contiguous_format
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _channels(input):
    """C of an (N, C, *) input; 0 for fewer dims, as the C++ checks count them."""
    return input.shape[1] if input.dim() >= 2 else 0


@torch.library.register_fake("layernorm_ext::batch_norm_forward")
def _batch_norm_forward_fake(
    input, weight, bias, running_mean, running_var, training, momentum, eps
):
    check_same_device(
        "batch_norm",
        input,
        running_mean=running_mean,
        running_var=running_var,
        weight=weight,
        bias=bias,
    )
    channels = _channels(input)
    dtype = stats_dtype(input.dtype)
    update = training and running_mean is not None
    return (
        torch.empty_like(input, memory_format=output_memory_format(input)),
        input.new_empty((channels,), dtype=dtype),
        input.new_empty((channels,), dtype=dtype),
        *(
            empty_unless(update, stat if stat is not None else input, (channels,))
            for stat in (running_mean, running_var)
        ),
    )


@torch.library.register_fake("layernorm_ext::batch_norm_backward")
def _batch_norm_backward_fake(
    grad_output, input, weight, bias, save_mean, save_rstd, training, output_mask
):
    check_same_device("batch_norm", input, weight=weight, bias=bias)
    check_same_device("batch_norm_backward", input, grad_output=grad_output)
    channels = _channels(input)
    weight_like = weight if weight is not None else input
    bias_like = bias if bias is not None else weight_like
    return (
        torch.empty_like(input, memory_format=output_memory_format(input))
        if output_mask[0]
        else input.new_empty((0,)),
        empty_unless(output_mask[1] and weight is not None, weight_like, (channels,)),
        empty_unless(output_mask[2] and bias is not None, bias_like, (channels,)),
    )
