"""SyncBatchNorm: BatchNorm whose training statistics are those of the global
batch, split over the ranks of a torch.distributed process group (gloo on CPU,
NCCL or gloo on CUDA), computed with the ``layernorm_ext::batch_norm_forward``
/ ``batch_norm_backward`` ops.

Per training call, each rank:
 - forward: computes its per-channel count, mean and M2 (sum of squared
   deviations) with the forward op, exchanges them in ONE all_gather of a
   [3, C] float64 tensor, merges them (Chan et al.'s pairwise formula) into the
   global mean and variance and normalizes its slice with them (the forward op
   in eval mode, the global statistics standing in for the running ones);
 - backward: computes its per-channel sum(dy) and sum(dy * xhat) with the
   backward op (in eval mode against the global statistics, where they are
   returned as grad_bias and grad_weight), sums them over the ranks in ONE
   all_reduce of a [2, C] float64 tensor, and forms the input gradient that a
   single BatchNorm over the global batch gives. weight and bias gradients stay
   local: DistributedDataParallel sums them as it does every other parameter's.

Outputs, input gradients, summed weight/bias gradients and running statistics
equal those of one BatchNorm over the concatenated batch (up to rounding),
whatever the local batch sizes, a rank with no samples included.
"""

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ._shapes import stats_dtype
from .batch_norm import _batch_norm_module_forward

_ops = torch.ops.layernorm_ext

# The widest input the ops take; SyncBatchNorm, like torch's, takes any
# (N, C, *) input and views a wider one as (N, C, L).
_MAX_OP_DIMS = 5


def _local_moments(input, weight, bias, running_mean, running_var, eps):
    """This rank's per-channel [count, mean, M2] as a [3, C] float64 tensor.

    The forward op in training mode gives the batch mean and rstd =
    1 / sqrt(var + eps); var = 1 / rstd**2 - eps recovers the biased variance
    to the rounding of rstd (relative 1e-7 of var + eps in float32, 1e-16 in
    float64), which is the precision a single BatchNorm's own float32
    statistics have, and exactly what torch's SyncBatchNorm exchanges. The
    variance is clamped at 0 where that rounding would make it negative.

    Passing the module's weight, bias and running statistics makes the op
    check them (and the input) on every rank before any collective runs; its
    output and updated running statistics are discarded.
    """
    channels = input.shape[1]
    count = input.numel() // channels
    # The op refuses one value per channel (a single-sample batch has no
    # variance), which is fine on one rank of many: that rank's mean is the
    # value itself and its M2 is 0; the op sees the value twice. An empty
    # input passes through the op (mean 0, M2 0 * anything = 0).
    batch = input.expand(2, *input.shape[1:]) if count == 1 else input
    _, mean, rstd, _, _ = _ops.batch_norm_forward(
        batch, weight, bias, running_mean, running_var, True, 0.0, float(eps)
    )
    var = (rstd.double().pow(-2) - eps).clamp_(min=0.0)
    return torch.stack([torch.full_like(var, count), mean.double(), var * count])


def _merge_moments(moments):
    """Global (count, mean, biased variance) from the [world, 3, C] gathered moments.

    Chan et al.'s merge in float64: mean = sum(n_r * mean_r) / n and M2 =
    sum(M2_r + n_r * (mean_r - mean)**2), the second term computed from
    differences of means, so no large sums of squares cancel. Ranks with no
    samples add zeros. Returns the count as a Python int (one device-to-host
    copy per call, which the count-1 checks need).
    """
    counts, means, m2s = moments.unbind(1)
    total = counts[:, :1].sum()
    mean = (counts * means).sum(0) / total
    m2 = (m2s + counts * (means - mean).square()).sum(0)
    return int(total.item()), mean, m2 / total


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm over the batch split across ``process_group``.

    Returns the normalized local slice and, as the forward op does, the
    updated running statistics (not differentiable; shape [0] without
    running statistics), which the caller copies into its buffers.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, process_group):
        moments = _local_moments(input, weight, bias, running_mean, running_var, eps)
        world_size = dist.get_world_size(process_group)
        gathered = [torch.empty_like(moments) for _ in range(world_size)]
        dist.all_gather(gathered, moments, group=process_group)
        count, mean, var = _merge_moments(torch.stack(gathered))
        if count == 1:
            # A single BatchNorm over the global batch raises this; all ranks
            # see the same count, so all raise, after the one collective.
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per "
                f"channel over the {world_size} ranks (local input size {list(input.shape)})"
            )
        # Normalize with the global statistics: the op in eval mode with them
        # as the running statistics. Statistics and parameters go in the
        # accumulation dtype (float32, or float64 for float64 input; the ops
        # take float32 parameters with float16/bfloat16 input), so that no
        # statistic is rounded to float16.
        acc = stats_dtype(input.dtype)
        weight_acc = None if weight is None else weight.to(acc)
        bias_acc = None if bias is None else bias.to(acc)
        output, save_mean, save_rstd, _, _ = _ops.batch_norm_forward(
            input, weight_acc, bias_acc, mean.to(acc), var.to(acc), False, 0.0, float(eps)
        )
        ctx.save_for_backward(input, weight_acc, save_mean, save_rstd)
        ctx.param_dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )
        ctx.count = count
        ctx.process_group = process_group
        new_mean, new_var = _updated_running_stats(
            running_mean, running_var, mean, var, count, momentum
        )
        ctx.mark_non_differentiable(new_mean, new_var)
        return output, new_mean, new_var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_new_mean, _grad_new_var):
        input, weight_acc, mean, rstd = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.param_dtypes
        # In eval mode the backward op's grad_weight and grad_bias are this
        # rank's sum(dy * xhat) and sum(dy), whatever the weight's values
        # (ones stand in, as the module may have no weight).
        ones = torch.ones_like(mean)
        _, sum_dy_xhat, sum_dy = _ops.batch_norm_backward(
            grad_output, input, ones, ones, mean, rstd, False, [False, True, True]
        )
        grad_input = None
        if ctx.needs_input_grad[0]:
            sums = torch.stack([sum_dy, sum_dy_xhat]).double()
            dist.all_reduce(sums, group=ctx.process_group)
            grad_input = _global_input_grad(
                grad_output, input, weight_acc, mean, rstd, sums, ctx.count
            )
        return (
            grad_input,
            sum_dy_xhat.to(weight_dtype) if ctx.needs_input_grad[1] else None,
            sum_dy.to(bias_dtype) if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
            None,
        )


def _updated_running_stats(running_mean, running_var, mean, var, count, momentum):
    """(1 - momentum) * running + momentum * global, with the unbiased global
    variance (count - 1 in the denominator), in the running statistics' dtype;
    unchanged for an empty global batch (as a single BatchNorm leaves them)
    and shape [0] without running statistics."""
    if running_mean is None:
        return mean.new_empty(0), var.new_empty(0)
    if count == 0:
        return running_mean.clone(), running_var.clone()
    unbiased_var = var * (count / (count - 1))
    return (
        torch.lerp(running_mean.double(), mean, momentum).to(running_mean.dtype),
        torch.lerp(running_var.double(), unbiased_var, momentum).to(running_var.dtype),
    )


def _global_input_grad(grad_output, input, weight, mean, rstd, sums, count):
    """BatchNorm's training-mode input gradient over a batch of ``count`` values
    per channel, whose sum(dy) and sum(dy * xhat) are ``sums``:

        dx = w * rstd * (dy - sum(dy) / count - xhat * sum(dy * xhat) / count)

    Per-channel coefficients in float64, the elementwise part in the
    accumulation dtype; x - mean is formed first, so no large terms cancel.
    """
    acc = mean.dtype
    sum_dy, sum_dy_xhat = sums
    scale = rstd.double() if weight is None else rstd.double() * weight.double()
    shape = (1, -1) + (1,) * (input.dim() - 2)
    dy_scale = scale.to(acc).view(shape)
    dy_shift = (scale * sum_dy / count).to(acc).view(shape)
    xmu_scale = (scale * rstd.double() * sum_dy_xhat / count).to(acc).view(shape)
    xmu = input.to(acc) - mean.view(shape)
    grad_input = grad_output.to(acc) * dy_scale
    grad_input.sub_(dy_shift).addcmul_(xmu, xmu_scale, value=-1)
    return grad_input.to(input.dtype)


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Drop-in for :class:`torch.nn.SyncBatchNorm`, computed by layernorm_ext's
    kernels, that runs on CPU tensors (gloo) as well as CUDA ones (NCCL or
    gloo).

    Same arguments, defaults, parameters and buffers (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``),
    ``process_group`` attribute, ``state_dict`` keys both ways, input checks
    and ``repr`` as torch.nn.SyncBatchNorm. In training, with an initialized
    process group of more than one rank, the statistics are those of the batch
    concatenated over the group's ranks (local batches may differ in size, or
    be empty): the result equals one BatchNorm over that batch. Otherwise
    (eval, no initialized group, a group of one rank) it is a BatchNorm of the
    local input. Unlike torch's, a call that raises leaves
    ``num_batches_tracked`` unchanged.

    It derives from torch's BatchNorm base class, not from
    torch.nn.SyncBatchNorm: DistributedDataParallel refuses any
    torch.nn.SyncBatchNorm instance in a CPU module.
    """

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias=True,
    ):
        # Torch versions whose BatchNorm has the bias switch are told of it
        # only when it is off, so that older ones still construct.
        no_bias = {} if bias else {"bias": False}
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **no_bias
        )
        self.process_group = process_group

    _check_input_dim = torch.nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = torch.nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if input.dim() > _MAX_OP_DIMS:
            flat = input.reshape(input.shape[0], input.shape[1], -1)
            return self.forward(flat).view(input.shape)
        process_group = self._sync_group()
        if process_group is None:
            return _batch_norm_module_forward(self, input)
        # torch's rules (see _batch_norm_module_forward): the buffers are
        # updated when tracked, the counter when it exists, and momentum=None
        # is a cumulative average over the batches seen, this one included.
        counting = self.track_running_stats and self.num_batches_tracked is not None
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked + 1) if counting else 0.0
        else:
            factor = self.momentum
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        output, new_mean, new_var = _SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            running_mean,
            running_var,
            factor,
            self.eps,
            process_group,
        )
        if running_mean is not None:
            with torch.no_grad():
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
        if counting:
            self.num_batches_tracked.add_(1)
        return output

    def _sync_group(self):
        """The process group to synchronize over, or None where this call is a
        local BatchNorm: eval, no initialized group, a group of one rank, or a
        rank outside the group (torch's rules)."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        process_group = self.process_group or dist.group.WORLD
        return process_group if dist.get_world_size(process_group) > 1 else None

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Returns ``module`` with every BatchNorm layer (any
        ``torch.nn.modules.batchnorm._BatchNorm``: torch's or layernorm_ext's
        BatchNorm1d/2d/3d, a torch.nn.SyncBatchNorm) replaced by a
        layernorm_ext SyncBatchNorm over ``process_group`` (default: the whole
        world), as torch.nn.SyncBatchNorm.convert_sync_batchnorm does: the new
        layer shares the old one's parameters and buffers (running
        statistics, ``num_batches_tracked``) and takes its train/eval mode
        (and ``qconfig``). A BatchNorm ``module`` itself is returned converted.
        """
        converted = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            converted = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                bias=not module.affine or module.bias is not None,
            )
            if module.affine:
                converted.weight = module.weight
                converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted
