// Argument checks, layout decisions and the gradient dtype rule shared by the
// BatchNorm ops of every backend. They raise torch.nn.functional.batch_norm's errors, with its
// wording where it has one, before any output is allocated or state touched.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>

#include <optional>
#include <tuple>

namespace layernorm_ext {

// An (N, C, *) input seen as N x C x inner, inner being the product of the
// spatial dims (1 for a 2-D input).
struct ChannelShape {
  int64_t batch;
  int64_t channels;
  int64_t inner;
};

// Checks a forward call: floating-point input of 2 or more dims (N, C, *), or
// an empty one; weight, bias, running_mean and running_var (each optional) of
// C elements on the input's device with an accepted dtype (any dtype for an
// empty input, as torch); in eval both running stats given; in training more
// than one value per channel. Returns the channel shape.
ChannelShape check_batch_norm_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training);

// Checks the input, weight and bias of a backward call as
// check_batch_norm_args checks a forward's (no running stats, and no batch
// size rule: an eval-mode backward may have one value per channel). Returns
// the channel shape.
ChannelShape check_batch_norm_affine_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias);

// Checks a backward call against its forward input: grad_output of the
// input's shape, dtype and device; saved statistics of C elements.
void check_batch_norm_backward_args(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& save_mean,
    const at::Tensor& save_rstd);

// The memory format the kernels run in: ChannelsLast for a 4-D input in
// torch.channels_last (ChannelsLast3d for a 5-D input in
// torch.channels_last_3d) that is not also plain contiguous, else
// Contiguous. Outputs (and grad_input) take the same memory format, and the
// fake kernels apply the same rule.
at::MemoryFormat batch_norm_memory_format(const at::Tensor& input);

// A new running statistic as the forward returns it: the kernels' value
// (accumulation type, shape [C], or [0] when not updated) in the running
// statistic's dtype (the input's when there is none). An empty batch leaves
// the statistic as it is, bit for bit, as torch does: it may be of a dtype
// wider than the accumulation type, since torch accepts any for an empty input.
at::Tensor batch_norm_new_running_stat(
    const at::Tensor& input,
    const std::optional<at::Tensor>& running_stat,
    const at::Tensor& new_stat_acc);

// The backward's weight and bias gradients, which the kernels sum in the
// accumulation type, in the parameters' dtypes; one not wanted (or of an
// absent parameter) has shape [0] and the dtype of weight, else bias, else
// the input.
std::tuple<at::Tensor, at::Tensor> batch_norm_param_grads(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    bool want_weight,
    const at::Tensor& grad_weight_acc,
    bool want_bias,
    const at::Tensor& grad_bias_acc);

} // namespace layernorm_ext
