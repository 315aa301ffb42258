// The derivative formulas that the autograd kernels (autograd_*_ops.cpp) record, in differentiable
// ATen ops (so that each formula has derivatives of its own: double backward,
// hessians, forward over reverse), for every norm at once.
//
// Every norm normalizes groups of elements of its input x by a per-group
// mean (unless it is RMSNorm) and rstd, then scales and shifts by parameters:
//   xhat = (x - mean) * rstd,  y = xhat * weight + bias.
// A row norm's groups are the rows of its trailing normalized dims and its
// parameters are shaped like those dims; BatchNorm's groups are its channels
// (all dims but 1) and its parameters have one element per channel. `Groups`
// says which, and broadcasts statistics and parameters against x.
//
// The backward ops compute, per group of `count` elements, with
// g = grad_output * weight:
//   grad_input  = rstd * (g - mean(g) - xhat * mean(g * xhat))   (batch statistics)
//               = rstd * g                                       (BatchNorm eval)
//   grad_weight = sum of grad_output * xhat over what shares a weight
//   grad_bias   = sum of grad_output over what shares a bias
// (no mean(g) term without centering). Their derivatives here are partial in
// the statistics, which the backward ops take as inputs.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <vector>

namespace layernorm_ext::autograd_formulas {

struct Groups {
  // A row norm over the trailing `normalized_dims` dims of an input of `dim` dims.
  static Groups rows(int64_t dim, int64_t normalized_dims);
  // BatchNorm's channels (dim 1) of an (N, C, *) input of `dim` dims.
  static Groups channels(int64_t dim);

  // A statistic (shaped like the groups) broadcast against the input.
  at::Tensor stat(const at::Tensor& stat) const;
  // A parameter (or its gradient) broadcast against the input.
  at::Tensor param(const at::Tensor& param) const;
  // The number of elements of each group of `input`.
  c10::SymInt count(const at::Tensor& input) const;
  // Means and sums over each group: statistic-shaped.
  at::Tensor group_mean(const at::Tensor& t) const;
  at::Tensor group_sum(const at::Tensor& t) const;
  // Sums over what shares a parameter, shaped like `param`.
  at::Tensor param_sum(const at::Tensor& t, const at::Tensor& param) const;

  std::vector<int64_t> group_dims;  // the dims one statistic covers
  std::vector<int64_t> param_dims;  // the dims a parameter gradient sums over
  int64_t stat_unit_dims = 0;       // unit dims appended to a statistic to broadcast it
  bool per_channel = false;         // BatchNorm's parameters: one element per channel
};

// a + b, where an undefined tensor stands for zero (undefined if both are).
at::Tensor add_defined(const at::Tensor& a, const at::Tensor& b);

// How a norm's statistics were computed: from the batch (every row norm,
// BatchNorm in training) or given (BatchNorm eval, from the running
// statistics, which are not differentiated).
struct Norm {
  Groups groups;
  bool center = true;       // subtracts the mean (LayerNorm, BatchNorm), else RMSNorm
  bool batch_stats = true;  // the statistics depend on the input
};

// The input's gradient through a norm's returned statistics, from their
// incoming gradients (undefined ones mean zero; undefined if both are):
// d mean / dx = 1 / count, d rstd / dx = -rstd^3 (x - mean) / count.
at::Tensor statistics_gradient(
    const Norm& norm,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const at::Tensor& grad_mean,
    const at::Tensor& grad_rstd);

// Forward mode through a forward op: the tangents of (output, mean, rstd)
// from those of (input, weight, bias), any of which may be undefined (zero).
// mean and rstd are the op's outputs; `input`, `weight` the primals. The
// statistics' tangents are undefined unless norm.batch_stats (and mean's
// unless norm.center).
struct ForwardTangents {
  at::Tensor output, mean, rstd;
};
ForwardTangents forward_tangents(
    const Norm& norm,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const at::Tensor& weight,
    const at::Tensor& input_tangent,
    const at::Tensor& weight_tangent,
    const at::Tensor& bias_tangent,
    at::ScalarType output_dtype);

// What a backward op was called with (mean undefined without centering,
// weight when absent).
struct BackwardInputs {
  at::Tensor grad_output, input, mean, rstd, weight;
};

// Reverse mode through a backward op: the gradients of its inputs
// (grad_output, input, mean, rstd, weight) from the incoming gradients of its
// outputs (grad_input, grad_weight, grad_bias), any of which may be
// undefined (zero). In the inputs' dtypes and shapes; mean's undefined
// without centering, weight's without a weight.
std::array<at::Tensor, 5> backward_gradients(
    const Norm& norm,
    const BackwardInputs& saved,
    const at::Tensor& grad_grad_input,
    const at::Tensor& grad_grad_weight,
    const at::Tensor& grad_grad_bias);

// Forward mode through a backward op: the tangents of (grad_input,
// grad_weight, grad_bias) from those of (grad_output, input, mean, rstd,
// weight), any of which may be undefined (zero); `primals` are the primals.
// An output not in `wanted`, or a parameter gradient without its parameter
// (`bias` stands for the bias's dtype), gets an undefined tangent.
std::array<at::Tensor, 3> backward_tangents(
    const Norm& norm,
    const BackwardInputs& primals,
    const at::Tensor& bias,
    const BackwardInputs& tangents,
    const std::array<bool, 3>& wanted);

}  // namespace layernorm_ext::autograd_formulas
