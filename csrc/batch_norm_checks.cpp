#include "batch_norm_checks.h"
#include "row_norm_checks.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <utility>

namespace layernorm_ext {
namespace {

using NamedParam = std::pair<const char*, const std::optional<at::Tensor>*>;

bool is_reduced_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

bool is_supported_input(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || is_reduced_float(t);
}

// Inputs of fewer than 2 dims have 0 channels, as torch counts them (a
// 0-dim input has a batch of 1).
ChannelShape channel_shape(const at::Tensor& input) {
  int64_t inner = 1;
  for (int64_t d = 2; d < input.dim(); ++d) inner *= input.size(d);
  return {input.dim() > 0 ? input.size(0) : 1, input.dim() >= 2 ? input.size(1) : 0, inner};
}

// The input and the per-channel tensors, in torch's order: all counts (C
// elements: torch checks the count, not the shape), then all devices (the
// input's), then the input's dtype, then theirs (the input's, or float32 for
// a float16/bfloat16 input, and all of one dtype: what torch's CPU kernel
// accepts), then a channel dim. torch returns the output of an empty input
// before any of these checks; we skip only those after the input's dtype
// (the kernels take the parameters converted to the accumulation type), so
// that a buffer of the wrong size or device still fails on an empty batch.
void check_input_and_params(
    const at::Tensor& input, int64_t channels, std::initializer_list<NamedParam> params) {
  for (const auto& [name, param] : params) {
    if (!param->has_value()) continue;
    TORCH_CHECK(
        (*param)->numel() == channels,
        name, " should contain ", channels, " elements not ", (*param)->numel());
  }
  for (const auto& [name, param] : params) {
    if (!param->has_value()) continue;
    TORCH_CHECK(
        (*param)->device() == input.device(),
        "batch_norm: expected ", name, " on the input's device ", input.device(),
        ", but got ", name, " on ", (*param)->device());
  }
  // torch raises NotImplementedError with this wording for integer inputs.
  TORCH_CHECK_NOT_IMPLEMENTED(
      is_supported_input(input.scalar_type()),
      "\"batch_norm\" not implemented for '", c10::toString(input.scalar_type()), "'");
  if (input.numel() == 0) return;
  const NamedParam* first = nullptr;
  for (const auto& param : params) {
    if (!param.second->has_value()) continue;
    const char* name = param.first;
    const at::Tensor& t = **param.second;
    const bool same = t.scalar_type() == input.scalar_type();
    const bool mixed = is_reduced_float(input.scalar_type()) && t.scalar_type() == at::kFloat;
    TORCH_CHECK(
        same || mixed,
        "batch_norm: expected ", name, " of dtype ", input.scalar_type(),
        (is_reduced_float(input.scalar_type()) ? " or Float" : ""),
        " (the input's dtype), but got ", name, " of dtype ", t.scalar_type());
    if (first == nullptr) {
      first = &param;
      continue;
    }
    const at::Tensor& f = **first->second;
    TORCH_CHECK(
        t.scalar_type() == f.scalar_type(),
        "batch_norm: expected running_mean, running_var, weight and bias of one dtype, but got ",
        first->first, " of dtype ", f.scalar_type(), " and ", name, " of dtype ", t.scalar_type());
  }
  // torch fails to index dim 1 here: an IndexError, a RuntimeError for 0 dims.
  TORCH_CHECK(
      input.dim() > 0,
      "batch_norm: expected an input of at least 2 dims (N, C, *), but got a 0-dim input");
  TORCH_CHECK_INDEX(
      input.dim() >= 2,
      "batch_norm: expected an input of at least 2 dims (N, C, *), but got input of size ",
      input.sizes(), " (", input.dim(), " dims)");
}

} // namespace

ChannelShape check_batch_norm_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training) {
  const ChannelShape shape = channel_shape(input);
  // torch.nn.functional.batch_norm's own check (a ValueError), which counts
  // values as N * spatial and lets an empty batch through; it fails to
  // index the size of a 0-dim input.
  TORCH_CHECK_INDEX(
      !training || input.dim() > 0,
      "batch_norm: expected an input of at least 2 dims (N, C, *), but got a 0-dim input");
  TORCH_CHECK_VALUE(
      !training || shape.batch * shape.inner != 1,
      "Expected more than 1 value per channel when training, got input size torch.Size(",
      input.sizes(), ")");
  if (training) {
    TORCH_CHECK_VALUE(
        running_mean.has_value() == running_var.has_value(),
        "running_mean and running_var must either both be None or neither be None");
  } else {
    TORCH_CHECK(running_mean.has_value(), "running_mean must be defined in evaluation mode");
    TORCH_CHECK(running_var.has_value(), "running_var must be defined in evaluation mode");
  }
  check_input_and_params(
      input, shape.channels,
      {{"running_mean", &running_mean}, {"running_var", &running_var}, {"weight", &weight},
       {"bias", &bias}});
  return shape;
}

ChannelShape check_batch_norm_affine_args(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias) {
  const ChannelShape shape = channel_shape(input);
  check_input_and_params(input, shape.channels, {{"weight", &weight}, {"bias", &bias}});
  return shape;
}

void check_batch_norm_backward_args(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& save_mean,
    const at::Tensor& save_rstd) {
  TORCH_CHECK(
      grad_output.sizes() == input.sizes(),
      "batch_norm_backward: expected grad_output of the input's shape ", input.sizes(),
      ", but got grad_output of shape ", grad_output.sizes());
  TORCH_CHECK(
      grad_output.scalar_type() == input.scalar_type(),
      "batch_norm_backward: expected grad_output of the input's dtype ", input.scalar_type(),
      ", but got grad_output of dtype ", grad_output.scalar_type());
  TORCH_CHECK(
      grad_output.device() == input.device(),
      "batch_norm_backward: expected grad_output on the input's device ", input.device(),
      ", but got grad_output on ", grad_output.device());
  const int64_t channels = input.dim() >= 2 ? input.size(1) : 0;
  const auto acc = accumulate_type(input.scalar_type());
  for (const auto& [name, stat] :
       {std::pair<const char*, const at::Tensor*>{"save_mean", &save_mean},
        std::pair<const char*, const at::Tensor*>{"save_rstd", &save_rstd}}) {
    TORCH_CHECK(
        stat->numel() == channels && stat->scalar_type() == acc &&
            stat->device() == input.device(),
        "batch_norm_backward: expected ", name, " of ", channels, " elements of dtype ", acc,
        " on ", input.device(), ", but got ", stat->numel(), " elements of dtype ",
        stat->scalar_type(), " on ", stat->device());
  }
}

at::MemoryFormat batch_norm_memory_format(const at::Tensor& input) {
  if (input.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

at::Tensor batch_norm_new_running_stat(
    const at::Tensor& input,
    const std::optional<at::Tensor>& running_stat,
    const at::Tensor& new_stat_acc) {
  if (!running_stat.has_value()) return new_stat_acc.to(input.scalar_type());
  if (input.numel() == 0 && new_stat_acc.numel() != 0) return running_stat->reshape({-1}).clone();
  return new_stat_acc.to(running_stat->scalar_type());
}

std::tuple<at::Tensor, at::Tensor> batch_norm_param_grads(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    bool want_weight,
    const at::Tensor& grad_weight_acc,
    bool want_bias,
    const at::Tensor& grad_bias_acc) {
  const auto weight_options = weight.has_value() ? weight->options() : input.options();
  const auto bias_options = bias.has_value() ? bias->options() : weight_options;
  return {want_weight ? grad_weight_acc.to(weight->scalar_type()) : at::empty({0}, weight_options),
          want_bias ? grad_bias_acc.to(bias->scalar_type()) : at::empty({0}, bias_options)};
}

} // namespace layernorm_ext
