// The LayerNorm and RMSNorm ops (plain, fused with a residual add, and their
// backward), written once for every backend: the checks (row_norm_checks.h),
// the arguments made contiguous, the outputs allocated in the dtypes and
// memory formats that torch's ops and the fake kernels give; then the
// backend's row kernels. A backend supplies `Kernels` with
//   template <bool kCenter> static void forward(const RowNormForward&);
//   template <bool kCenter> static void backward(const RowNormBackward&);
// (kCenter: LayerNorm, else RMSNorm), which fill the outputs, and registers
// the ops with register_row_norm_ops<Kernels>(m): cpu/row_norm_cpu.cpp,
// cuda/row_norm_cuda.cpp.
#pragma once

#include "op_arguments.h"
#include "row_norm_checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace layernorm_ext {

// A forward call as the kernels see it: contiguous arguments (but for an
// input that is_channels_first_view, for a backend that reads those),
// allocated contiguous outputs.
struct RowNormForward {
  RowShape shape;
  at::Tensor input;
  at::Tensor residual;  // the fused ops' (the row is input + residual), else undefined
  std::optional<at::Tensor> weight, bias;  // absent when not given (RMSNorm has no bias)
  double eps = 0;
  at::Tensor output;
  at::Tensor sum;  // the fused ops' input + residual, else undefined
  at::Tensor mean;  // LayerNorm's (accumulation type), undefined for RMSNorm
  at::Tensor rstd;  // accumulation type
};

// A backward call as the kernels see it (input and grad_output contiguous, or
// channels-first views as in RowNormForward). Each gradient is undefined when not
// asked for (a parameter's also when the parameter is absent); the parameter
// gradients are in their parameter's dtype.
struct RowNormBackward {
  RowShape shape;
  at::Tensor grad_output, input;
  at::Tensor mean;  // LayerNorm's, undefined for RMSNorm
  at::Tensor rstd;
  std::optional<at::Tensor> weight;
  at::Tensor grad_input, grad_weight, grad_bias;
};

namespace row_norm_ops {

// Whether `input`, normalized over its last dim, is the channels-last view of
// a contiguous channels-first tensor: x.permute(0, 2, ..., d-1, 1) of an
// (N, C, *spatial) tensor, as timm's LayerNorm2d passes to layer_norm. Its
// rows (positions) hold their channels a plane apart; a backend whose
// Kernels declare `static constexpr bool kReadsChannelsFirst = true` reads
// it as it is (the outputs are contiguous all the same), in the forward and
// the backward (input, grad_output or both), saving a copy of each.
inline bool is_channels_first_view(const at::Tensor& input, at::IntArrayRef normalized_shape) {
  const int64_t dims = input.dim();
  if (normalized_shape.size() != 1 || dims < 3 || input.numel() == 0 || input.is_contiguous()) {
    return false;
  }
  std::vector<int64_t> channels_first{0, dims - 1};
  for (int64_t d = 1; d < dims - 1; ++d) channels_first.push_back(d);
  return input.permute(channels_first).is_contiguous();
}

template <class Kernels, class = void>
struct ReadsChannelsFirst : std::false_type {};
template <class Kernels>
struct ReadsChannelsFirst<Kernels, std::void_t<decltype(Kernels::kReadsChannelsFirst)>>
    : std::bool_constant<Kernels::kReadsChannelsFirst> {};

template <class Kernels, bool kCenter>
RowNormForward forward(
    const char* op,
    const at::Tensor& input,
    const std::optional<at::Tensor>& residual,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps) {
  RowNormForward call;
  call.shape = check_row_norm_args(op, input, normalized_shape, weight, bias);
  if (residual) check_residual(op, input, *residual);
  const bool channels_first = ReadsChannelsFirst<Kernels>::value && !residual &&
      is_channels_first_view(input, normalized_shape);
  call.input = channels_first ? input : input.contiguous();
  if (residual) call.residual = residual->contiguous();
  call.weight = optional_contiguous(weight);
  call.bias = optional_contiguous(bias);
  call.eps = eps;
  const auto options = call.input.options();
  call.output = at::empty(input.sizes(), options);
  if (residual) call.sum = at::empty(input.sizes(), options);
  const auto stats_options = options.dtype(accumulate_type(input.scalar_type()));
  const auto stats_sizes = stats_shape(input, normalized_shape);
  if (kCenter) call.mean = at::empty(stats_sizes, stats_options);
  call.rstd = at::empty(stats_sizes, stats_options);
  Kernels::template forward<kCenter>(call);
  return call;
}


template <class Kernels, bool kCenter>
std::array<at::Tensor, 3> backward(
    const char* op,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    std::array<bool, 3> output_mask) {
  RowNormBackward call;
  call.shape = check_row_norm_args(op, input, normalized_shape, weight, bias);
  if (kCenter) {
    check_row_norm_backward_args(op, grad_output, input, call.shape, {&mean, &rstd});
  } else {
    check_row_norm_backward_args(op, grad_output, input, call.shape, {&rstd});
  }
  const auto as_read = [&](const at::Tensor& t) {
    return ReadsChannelsFirst<Kernels>::value && is_channels_first_view(t, normalized_shape)
        ? t
        : t.contiguous();
  };
  call.grad_output = as_read(grad_output);
  call.input = as_read(input);
  if (kCenter) call.mean = mean.contiguous();
  call.rstd = rstd.contiguous();
  call.weight = optional_contiguous(weight);
  // The parameter gradients, and the empty ones not asked for, take their
  // parameter's dtype (the weight's, else the input's, for an absent one).
  const auto weight_options = weight ? weight->options() : input.options();
  const auto bias_options = bias ? bias->options() : weight_options;
  if (output_mask[0]) call.grad_input = at::empty(input.sizes(), call.input.options());
  if (output_mask[1] && weight) call.grad_weight = at::empty(normalized_shape, weight_options);
  if (output_mask[2] && bias) call.grad_bias = at::empty(normalized_shape, bias_options);
  Kernels::template backward<kCenter>(call);
  return {or_empty(call.grad_input, input.options()), or_empty(call.grad_weight, weight_options),
          or_empty(call.grad_bias, bias_options)};
}

// A contiguous output `t` laid out in `format`: `t` itself for Contiguous,
// else a copy.
inline at::Tensor in_memory_format(const at::Tensor& t, at::MemoryFormat format) {
  if (format == at::MemoryFormat::Contiguous) return t;
  return at::empty(t.sizes(), t.options().memory_format(format)).copy_(t);
}

// The ops' kernels for one backend, with the schemas' signatures.
template <class Kernels>
struct Ops {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(
      const at::Tensor& input,
      at::IntArrayRef normalized_shape,
      const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias,
      double eps) {
    const auto call = forward<Kernels, /*kCenter=*/true>(
        "layer_norm", input, std::nullopt, normalized_shape, weight, bias, eps);
    return {call.output, call.mean, call.rstd};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_add_layer_norm_forward(
      const at::Tensor& input,
      const at::Tensor& residual,
      at::IntArrayRef normalized_shape,
      const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias,
      double eps) {
    const auto call = forward<Kernels, /*kCenter=*/true>(
        "fused_add_layer_norm", input, residual, normalized_shape, weight, bias, eps);
    return {call.output, call.sum, call.mean, call.rstd};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      at::IntArrayRef normalized_shape,
      const at::Tensor& mean,
      const at::Tensor& rstd,
      const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias,
      std::array<bool, 3> output_mask) {
    const auto [grad_input, grad_weight, grad_bias] = backward<Kernels, /*kCenter=*/true>(
        "layer_norm_backward", grad_output, input, normalized_shape, mean, rstd, weight, bias,
        output_mask);
    return {grad_input, grad_weight, grad_bias};
  }

  // The output keeps a channels_last(_3d) input's layout, as torch's does
  // (rms_norm_memory_format).
  static std::tuple<at::Tensor, at::Tensor> rms_norm_forward(
      const at::Tensor& input,
      at::IntArrayRef normalized_shape,
      const std::optional<at::Tensor>& weight,
      double eps) {
    const auto call = forward<Kernels, /*kCenter=*/false>(
        "rms_norm", input, std::nullopt, normalized_shape, weight, std::nullopt, eps);
    return {in_memory_format(call.output, rms_norm_memory_format(input)), call.rstd};
  }

  // Both outputs contiguous, as the fake kernel's are.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_add_rms_norm_forward(
      const at::Tensor& input,
      const at::Tensor& residual,
      at::IntArrayRef normalized_shape,
      const std::optional<at::Tensor>& weight,
      double eps) {
    const auto call = forward<Kernels, /*kCenter=*/false>(
        "fused_add_rms_norm", input, residual, normalized_shape, weight, std::nullopt, eps);
    return {call.output, call.sum, call.rstd};
  }

  // grad_input keeps a channels_last(_3d) grad_output's layout.
  static std::tuple<at::Tensor, at::Tensor> rms_norm_backward(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      at::IntArrayRef normalized_shape,
      const at::Tensor& rstd,
      const std::optional<at::Tensor>& weight,
      std::array<bool, 2> output_mask) {
    const auto [grad_input, grad_weight, grad_bias] = backward<Kernels, /*kCenter=*/false>(
        "rms_norm_backward", grad_output, input, normalized_shape, at::Tensor(), rstd, weight,
        std::nullopt, {output_mask[0], output_mask[1], false});
    return {output_mask[0] ? in_memory_format(grad_input, rms_norm_memory_format(grad_output))
                           : grad_input,
            grad_weight};
  }
};

}  // namespace row_norm_ops

template <class Kernels>
void register_row_norm_ops(torch::Library& m) {
  using Ops = row_norm_ops::Ops<Kernels>;
  m.impl("layer_norm_forward", &Ops::layer_norm_forward);
  m.impl("fused_add_layer_norm_forward", &Ops::fused_add_layer_norm_forward);
  m.impl("layer_norm_backward", &Ops::layer_norm_backward);
  m.impl("rms_norm_forward", &Ops::rms_norm_forward);
  m.impl("fused_add_rms_norm_forward", &Ops::fused_add_rms_norm_forward);
  m.impl("rms_norm_backward", &Ops::rms_norm_backward);
}

}  // namespace layernorm_ext
