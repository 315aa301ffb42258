"""Batching rules of every layernorm_ext op, for torch.func.vmap and the
transforms built on it (jacrev, jacfwd, hessian, per-sample gradients).

Without them vmap would call the op once per sample (torch's slow fallback).
Each rule makes one call on a larger problem instead: the vmapped dim joins
the dims that the op already normalizes independently, the leading (row)
dims of a row norm and the channels of BatchNorm (whose per-channel
parameters and statistics simply become per-sample-and-channel ones). A row
norm's parameters apply to whole rows, so per-sample ones (ensembles of
models) are applied, and their per-sample gradients summed, in ATen ops in
the statistics' dtype, as the kernels compute them.
"""

import torch

_ops = torch.ops.layernorm_ext


def _at_front(t, dim, size):
    """t with the vmapped dim first: moved there, or t expanded along it when
    not batched (None stays None)."""
    if t is None:
        return None
    if dim is None:
        return t.expand(size, *t.shape)
    return t.movedim(dim, 0)


def _sum_over(t, dims):
    """A sum over dims; none leaves t as it is (sum over () would sum all)."""
    return t.sum(dims) if dims else t


def _unbatched_empty(like):
    """A gradient the op was not asked for: shape [0], the same for every sample."""
    return like.new_empty((0,)), None


class _Rows:
    """A vmapped row norm's input, vmapped dim first, and how its statistics
    and parameters broadcast against it."""

    def __init__(self, input, normalized_shape, size):
        self.input = input
        self.normalized_shape = tuple(normalized_shape)
        self.size = size
        k = len(self.normalized_shape)
        # Each sample's own row dims: a parameter gradient sums over them.
        self.row_dims = tuple(range(1, input.dim() - k))
        self._stat_shape_tail = (1,) * k

    def stat(self, s):
        return s.reshape(*s.shape, *self._stat_shape_tail)

    def param(self, p, dim, dtype):
        """A (possibly per-sample) parameter broadcast against the input."""
        if dim is None:
            return p.to(dtype)
        p = _at_front(p, dim, self.size)
        return p.reshape(self.size, *((1,) * len(self.row_dims)), *self.normalized_shape).to(dtype)

    def xhat(self, mean, rstd):
        x = self.input.to(rstd.dtype)
        return (x - self.stat(mean) if mean is not None else x) * self.stat(rstd)


def _row_norm_forward_rule(op, addends, center):
    """layer_norm_forward / rms_norm_forward and their fused_add_* forms:
    (*addends, normalized_shape, weight, [bias], eps)."""

    def rule(info, in_dims, *args):
        size = info.batch_size
        rows = [_at_front(t, d, size) for t, d in zip(args[:addends], in_dims[:addends])]
        normalized_shape, params, eps = args[addends], args[addends + 1 : -1], args[-1]
        param_dims = in_dims[addends + 1 : -1]
        if all(d is None for d in param_dims):
            outputs = op(*rows, normalized_shape, *params, eps)
            return outputs, (0,) * len(outputs)
        outputs = op(*rows, normalized_shape, *((None,) * len(params)), eps)
        rstd = outputs[-1]
        mean = outputs[-2] if center else None
        normalized = rows[0] if addends == 1 else outputs[1]
        shape = _Rows(normalized, normalized_shape, size)
        output = shape.xhat(mean, rstd)
        weight, weight_dim = params[0], param_dims[0]
        if weight is not None:
            output = output * shape.param(weight, weight_dim, rstd.dtype)
        if center and params[1] is not None:
            output = output + shape.param(params[1], param_dims[1], rstd.dtype)
        return (output.to(normalized.dtype), *outputs[1:]), (0,) * len(outputs)

    return rule


def _row_norm_backward_rule(op, center):
    """layer_norm_backward (grad_output, input, normalized_shape, mean, rstd,
    weight, bias, output_mask) / rms_norm_backward (grad_output, input,
    normalized_shape, rstd, weight, output_mask): grad_input from one call on
    the samples as more rows, the per-sample parameter gradients in ATen ops
    (the op would sum them over all samples)."""

    def rule(info, in_dims, *args):
        size = info.batch_size
        if center:
            grad_output, input, normalized_shape, mean, rstd, weight, bias, mask = args
            go_dim, x_dim, _, mean_dim, rstd_dim, weight_dim, _, _ = in_dims
            mean = _at_front(mean, mean_dim, size)
        else:
            grad_output, input, normalized_shape, rstd, weight, mask = args
            go_dim, x_dim, _, rstd_dim, weight_dim, _ = in_dims
            mean, bias = None, None
        grad_output = _at_front(grad_output, go_dim, size)
        input = _at_front(input, x_dim, size)
        rstd = _at_front(rstd, rstd_dim, size)
        stats = (mean, rstd) if center else (rstd,)
        acc = rstd.dtype
        shape = _Rows(input, normalized_shape, size)

        results = []
        if mask[0]:
            input_mask = [True, False, False][: len(mask)]
            if weight_dim is None:
                params = (weight, bias) if center else (weight,)
                grad_input = op(grad_output, input, normalized_shape, *stats, *params, input_mask)[0]
            else:
                # g = grad_output * weight, as the kernel forms it (in float32
                # for half inputs), then the op without a weight.
                scaled = grad_output.to(acc) * shape.param(weight, weight_dim, acc)
                no_params = (None, None) if center else (None,)
                grad_input = op(
                    scaled, input.to(acc), normalized_shape, *stats, *no_params, input_mask
                )[0].to(input.dtype)
            results.append((grad_input, 0))
        else:
            results.append(_unbatched_empty(input))
        if mask[1] and weight is not None:
            grad_weight = _sum_over(grad_output.to(acc) * shape.xhat(mean, rstd), shape.row_dims)
            results.append((grad_weight.to(weight.dtype), 0))
        else:
            results.append(_unbatched_empty(input))
        if center:
            if mask[2] and bias is not None:
                results.append((_sum_over(grad_output.to(acc), shape.row_dims).to(bias.dtype), 0))
            else:
                results.append(_unbatched_empty(input))
        return tuple(r for r, _ in results), tuple(d for _, d in results)

    return rule


# BatchNorm: sample s's channel c becomes channel s * C + c of one input
# (N, size * C, *). A 1-D input has no channel dim (C = 0; the op accepts
# only an empty one): the samples' inputs are laid end to end instead.


def _fold(t, dim, size):
    """(N, C, *) per sample -> (N, size * C, *); (N,) -> (size * N,)."""
    t = _at_front(t, dim, size)
    if t.dim() == 2:
        return t.flatten()
    return t.movedim(0, 1).flatten(1, 2)


def _unfold(t, size):
    """(N, size * C, *) -> (size, N, C, *); (size * N,), empty, -> (size, 0)."""
    if t.dim() == 1:
        return t.view(size, 0)
    return t.unflatten(1, (size, -1)).movedim(1, 0)


def _fold_channels(t, dim, size):
    """A per-channel tensor (C elements, any shape) -> (size * C,). (The size
    is explicit: reshape(-1) of an empty tensor fails under an enclosing vmap,
    which reshapes it to [outer size, -1].)"""
    if t is None:
        return None
    t = _at_front(t, dim, size)
    return t.reshape(t.numel())


def _per_sample_channels(t, size):
    """The op's (size * C,) result as (size, C), or, empty (C = 0, or the
    [0]-shaped 'none'), as it is, the same for every sample."""
    return (t, None) if t.numel() == 0 else (t.view(size, -1), 0)


def _new_running_stat(t, size, batched):
    """A new running statistic as _per_sample_channels gives it; one of an
    unbatched buffer (from an unbatched input: the same for every sample)
    unbatched, as the buffer it is copied into."""
    t, dim = _per_sample_channels(t, size)
    return (t, dim) if batched or dim is None else (t[0], None)


# torch's error (functorch's batch_norm rule), word for word.
_UNBATCHED_RUNNING_STATS = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, which "
    "will be updated in place, were not batched.\nIf you are using a module and do not need "
    "eval mode, please set `track_running_stats` to be False.If you are using a prebuilt "
    "module and do not need eval mode, please see the functorch website for resources on "
    "how to patch your module to work with vmap"
)


def _batch_norm_forward_rule(info, in_dims, input, weight, bias, running_mean, running_var,
                             training, momentum, eps):
    size = info.batch_size
    input_dim, stat_dims = in_dims[0], in_dims[3:5]
    stats = (running_mean, running_var)
    if training and input_dim is not None and any(
        stat is not None and dim is None for stat, dim in zip(stats, stat_dims)
    ):
        raise RuntimeError(_UNBATCHED_RUNNING_STATS)
    channels = [
        _fold_channels(t, d, size)
        for t, d in zip((weight, bias, running_mean, running_var), in_dims[1:5])
    ]
    output, mean, rstd, new_mean, new_var = _ops.batch_norm_forward(
        _fold(input, input_dim, size), *channels, training, momentum, eps
    )
    results = [
        (_unfold(output, size), 0),
        _per_sample_channels(mean, size),
        _per_sample_channels(rstd, size),
        *(_new_running_stat(new, size, input_dim is not None or dim is not None)
          for new, dim in zip((new_mean, new_var), stat_dims)),
    ]
    return tuple(r for r, _ in results), tuple(d for _, d in results)


def _batch_norm_backward_rule(info, in_dims, grad_output, input, weight, bias, save_mean,
                              save_rstd, training, output_mask):
    size = info.batch_size
    grad_input, grad_weight, grad_bias = _ops.batch_norm_backward(
        _fold(grad_output, in_dims[0], size),
        _fold(input, in_dims[1], size),
        *(_fold_channels(t, d, size) for t, d in zip((weight, bias, save_mean, save_rstd), in_dims[2:6])),
        training,
        output_mask,
    )
    results = [
        (_unfold(grad_input, size), 0) if output_mask[0] else (grad_input, None),
        _per_sample_channels(grad_weight, size),
        _per_sample_channels(grad_bias, size),
    ]
    return tuple(r for r, _ in results), tuple(d for _, d in results)


_RULES = {
    "layer_norm_forward": _row_norm_forward_rule(_ops.layer_norm_forward, 1, center=True),
    "rms_norm_forward": _row_norm_forward_rule(_ops.rms_norm_forward, 1, center=False),
    "fused_add_layer_norm_forward": _row_norm_forward_rule(
        _ops.fused_add_layer_norm_forward, 2, center=True
    ),
    "fused_add_rms_norm_forward": _row_norm_forward_rule(
        _ops.fused_add_rms_norm_forward, 2, center=False
    ),
    "layer_norm_backward": _row_norm_backward_rule(_ops.layer_norm_backward, center=True),
    "rms_norm_backward": _row_norm_backward_rule(_ops.rms_norm_backward, center=False),
    "batch_norm_forward": _batch_norm_forward_rule,
    "batch_norm_backward": _batch_norm_backward_rule,
}

for _name, _rule in _RULES.items():
    torch.library.register_vmap(f"layernorm_ext::{_name}", _rule)
