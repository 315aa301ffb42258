// Autograd kernels of the forward ops, one registration for every backend
// (DispatchKey Autograd): each is a torch::autograd::Function whose forward
// calls the op below autograd and whose backward calls the matching backward
// op through the dispatcher, plus the input's gradient through the returned
// statistics.
//
// They are C++ because an autograd kernel registered from Python
// (torch.library.register_autograd) runs on every call, with or without
// grad, and its few microseconds are most of the time of a small norm. The
// backward ops keep their Python autograd (closed-form double backward in
// layernorm_ext/_row_norm_autograd.py and batch_norm.py), which the
// dispatcher reaches when the backward below is itself recorded
// (create_graph); the statistics path is written in ATen ops, so that it is
// differentiable too.
//
// normalized_shape is SymInt[] in the schemas (a kernel taking SymInts cannot
// be registered for int[]), and these kernels take and pass it on as SymInts
// (the ops' SymInt-typed handles): under torch.compile(dynamic=True) and
// opcheck's aot_dispatch_dynamic test the sizes are symbolic, and an
// IntArrayRef would fail on them.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <utility>

namespace layernorm_ext {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensors2 = std::tuple<Tensor, Tensor>;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensors4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensors5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// The ops' C++ signatures (csrc/ops.cpp has their schemas), with SymInt sizes.
using LayerNormForward = Tensors3(
    const Tensor&, c10::SymIntArrayRef, const OptionalTensor&, const OptionalTensor&, double);
using LayerNormBackward = Tensors3(
    const Tensor&, const Tensor&, c10::SymIntArrayRef, const Tensor&, const Tensor&,
    const OptionalTensor&, const OptionalTensor&, std::array<bool, 3>);
using RmsNormForward = Tensors2(const Tensor&, c10::SymIntArrayRef, const OptionalTensor&, double);
using RmsNormBackward = Tensors2(
    const Tensor&, const Tensor&, c10::SymIntArrayRef, const Tensor&, const OptionalTensor&,
    std::array<bool, 2>);
using FusedAddLayerNormForward = Tensors4(
    const Tensor&, const Tensor&, c10::SymIntArrayRef, const OptionalTensor&,
    const OptionalTensor&, double);
using FusedAddRmsNormForward = Tensors3(
    const Tensor&, const Tensor&, c10::SymIntArrayRef, const OptionalTensor&, double);
using BatchNormForward = Tensors5(
    const Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
    const OptionalTensor&, bool, double, double);
using BatchNormBackward = Tensors3(
    const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&,
    const Tensor&, bool, std::array<bool, 3>);

template <class Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The ops' dispatcher handles, looked up on the first call (ops.cpp has
// defined the schemas by then).
struct Ops {
  c10::TypedOperatorHandle<LayerNormForward> layer_norm_forward =
      find_op<LayerNormForward>("layernorm_ext::layer_norm_forward");
  c10::TypedOperatorHandle<LayerNormBackward> layer_norm_backward =
      find_op<LayerNormBackward>("layernorm_ext::layer_norm_backward");
  c10::TypedOperatorHandle<RmsNormForward> rms_norm_forward =
      find_op<RmsNormForward>("layernorm_ext::rms_norm_forward");
  c10::TypedOperatorHandle<RmsNormBackward> rms_norm_backward =
      find_op<RmsNormBackward>("layernorm_ext::rms_norm_backward");
  c10::TypedOperatorHandle<FusedAddLayerNormForward> fused_add_layer_norm_forward =
      find_op<FusedAddLayerNormForward>("layernorm_ext::fused_add_layer_norm_forward");
  c10::TypedOperatorHandle<FusedAddRmsNormForward> fused_add_rms_norm_forward =
      find_op<FusedAddRmsNormForward>("layernorm_ext::fused_add_rms_norm_forward");
  c10::TypedOperatorHandle<BatchNormForward> batch_norm_forward =
      find_op<BatchNormForward>("layernorm_ext::batch_norm_forward");
  c10::TypedOperatorHandle<BatchNormBackward> batch_norm_backward =
      find_op<BatchNormBackward>("layernorm_ext::batch_norm_backward");
};

const Ops& ops() {
  static const Ops handles;
  return handles;
}

// Calls an op's kernel for the backend, skipping the autograd keys (ours
// included).
template <class Signature, class... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  const at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(std::forward<Args>(args)...);
}

// Whether autograd must record a call on these tensors: grad mode is on and
// one of them requires grad. When it need not (torch.no_grad, nothing
// requiring grad; in backward, no create_graph) the ops below run without
// their autograd kernels: a forward's Function::apply would build a node only
// to drop it (and refuses functorch transforms such as vmap even then), and
// a backward op's Python autograd kernel costs microseconds to record nothing.
template <class... Args>
bool records_grad(const Args&... tensors) {
  return torch::autograd::compute_requires_grad(tensors...);
}

// Calls an op through its autograd kernel if `record`, else below it.
template <class Signature, class... Args>
auto call_op(const c10::TypedOperatorHandle<Signature>& op, bool record, Args&&... args) {
  if (record) return op.call(std::forward<Args>(args)...);
  return call_below_autograd(op, std::forward<Args>(args)...);
}

OptionalTensor optional_if_defined(const Tensor& t) {
  return t.defined() ? OptionalTensor(t) : std::nullopt;
}

// needs_input_grad of a Function's leading tensor arguments, `present[i]`
// saying whether argument i was given: autograd numbers only the tensors
// present (an absent std::optional has no index), and an absent one wants no
// gradient.
template <size_t N>
std::array<bool, N> wanted_grads(AutogradContext* ctx, std::array<bool, N> present) {
  std::array<bool, N> wanted{};
  size_t index = 0;
  for (size_t i = 0; i < N; ++i) {
    if (present[i]) wanted[i] = ctx->needs_input_grad(index++);
  }
  return wanted;
}

template <size_t... I>
auto as_tuple(const variable_list& outputs, std::index_sequence<I...>) {
  return std::make_tuple(outputs[I]...);
}

template <size_t N>
auto as_tuple(const variable_list& outputs) {
  return as_tuple(outputs, std::make_index_sequence<N>());
}

// The sum of the defined tensors among a and b (undefined if neither is):
// an undefined gradient stands for zero.
Tensor add_defined(const Tensor& a, const Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a + b;
}

// The backward ops return [0]-shaped tensors for the gradients not asked
// for; autograd wants undefined ones.
void keep_masked(std::array<Tensor, 3>& grads, const std::array<bool, 3>& mask) {
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!mask[i]) grads[i] = Tensor();
  }
}

// The input gradient that flows back through a norm's returned statistics,
// from their incoming gradients (either may be undefined; undefined if both
// are): d mean / dx = 1 / count and d rstd / dx = -rstd^3 (x - mean) / count,
// where count is the number of elements each statistic covers. mean is
// undefined for RMSNorm (x is not centered). The statistics broadcast against
// the input once `trailing` unit dims are appended: the normalized dims of a
// row norm, the spatial dims of BatchNorm (per-channel statistics of an
// (N, C, *) input). Computed in the statistics' dtype, as the kernels do.
Tensor statistics_gradient(
    const Tensor& input,
    const Tensor& mean,
    const Tensor& rstd,
    const Tensor& grad_mean,
    const Tensor& grad_rstd,
    int64_t trailing,
    const c10::SymInt& count) {
  if (!grad_mean.defined() && !grad_rstd.defined()) return Tensor();
  const auto broadcastable = [trailing](Tensor stat) {
    for (int64_t i = 0; i < trailing; ++i) stat = stat.unsqueeze(-1);
    return stat;
  };
  const auto x = input.to(rstd.scalar_type());
  // The rstd term has the input's shape; the mean term only broadcasts to it.
  auto grad = grad_rstd.defined()
      ? broadcastable(-grad_rstd * rstd.pow(3)) * (mean.defined() ? x - broadcastable(mean) : x)
      : at::zeros_like(x);
  if (grad_mean.defined()) grad = grad + broadcastable(grad_mean);
  return grad.div(c10::Scalar(count)).to(input.scalar_type());
}

// ---- LayerNorm and RMSNorm, plain and with the fused residual add ----------

// What a row norm's backward needs: the normalized tensor (the input, or the
// sum of the fused ops), the parameters (undefined when absent), the
// statistics (mean undefined for RMSNorm) and normalized_shape.
void save_row_norm(
    AutogradContext* ctx,
    const Tensor& normalized,
    c10::SymIntArrayRef normalized_shape,
    const OptionalTensor& weight,
    const OptionalTensor& bias,
    const Tensor& mean,
    const Tensor& rstd) {
  ctx->save_for_backward(
      {normalized, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, rstd});
  ctx->saved_data["normalized_shape"] = normalized_shape;
  // An undefined incoming gradient means zero: no materialized zeros.
  ctx->set_materialize_grads(false);
}

// Gradients of a row norm's (normalized tensor, weight, bias) from those of
// its (output, mean, rstd), each of which may be undefined: the backward op
// for grad_output, plus the input's path through the statistics. LayerNorm
// when center, else RMSNorm (no mean, bias or grad_mean). The Function's
// tensor arguments are the input (and the residual when fused), then weight
// and bias when given; a gradient autograd does not ask for (for the fused
// ops: for neither addend), or of an absent parameter, is undefined.
std::array<Tensor, 3> row_norm_grads(
    AutogradContext* ctx,
    bool center,
    bool fused,
    const Tensor& grad_output,
    const Tensor& grad_mean,
    const Tensor& grad_rstd) {
  const auto saved = ctx->get_saved_variables();
  const auto& normalized = saved[0];
  const auto& weight = saved[1];
  const auto& bias = saved[2];
  const auto& mean = saved[3];
  const auto& rstd = saved[4];
  const auto normalized_shape = ctx->saved_data.at("normalized_shape").toSymIntVector();
  const auto wanted = wanted_grads<4>(ctx, {true, fused, weight.defined(), bias.defined()});
  const std::array<bool, 3> mask{wanted[0] || wanted[1], wanted[2], wanted[3]};
  std::array<Tensor, 3> grads;
  if (grad_output.defined()) {
    const bool record = records_grad(grad_output, normalized, mean, rstd, weight, bias);
    if (center) {
      std::tie(grads[0], grads[1], grads[2]) = call_op(
          ops().layer_norm_backward, record, grad_output, normalized, normalized_shape, mean,
          rstd, optional_if_defined(weight), optional_if_defined(bias), mask);
    } else {
      std::tie(grads[0], grads[1]) = call_op(
          ops().rms_norm_backward, record, grad_output, normalized, normalized_shape, rstd,
          optional_if_defined(weight), std::array<bool, 2>{mask[0], mask[1]});
    }
  }
  keep_masked(grads, mask);
  if (mask[0]) {
    c10::SymInt cols = 1;
    for (const auto& size : normalized_shape) cols = cols * size;
    grads[0] = add_defined(
        grads[0],
        statistics_gradient(
            normalized, mean, rstd, grad_mean, grad_rstd,
            static_cast<int64_t>(normalized_shape.size()), cols));
  }
  return grads;
}

struct LayerNormFunction : torch::autograd::Function<LayerNormFunction> {
  static variable_list forward(
      AutogradContext* ctx,
      const Tensor& input,
      c10::SymIntArrayRef normalized_shape,
      const OptionalTensor& weight,
      const OptionalTensor& bias,
      double eps) {
    auto [output, mean, rstd] = call_below_autograd(
        ops().layer_norm_forward, input, normalized_shape, weight, bias, eps);
    save_row_norm(ctx, input, normalized_shape, weight, bias, mean, rstd);
    return {output, mean, rstd};
  }

  // grads: of (output, mean, rstd). Returns one per forward argument.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto [grad_input, grad_weight, grad_bias] =
        row_norm_grads(ctx, /*center=*/true, /*fused=*/false, grads[0], grads[1], grads[2]);
    return {grad_input, Tensor(), grad_weight, grad_bias, Tensor()};
  }
};

struct RmsNormFunction : torch::autograd::Function<RmsNormFunction> {
  static variable_list forward(
      AutogradContext* ctx,
      const Tensor& input,
      c10::SymIntArrayRef normalized_shape,
      const OptionalTensor& weight,
      double eps) {
    auto [output, rstd] =
        call_below_autograd(ops().rms_norm_forward, input, normalized_shape, weight, eps);
    save_row_norm(ctx, input, normalized_shape, weight, std::nullopt, Tensor(), rstd);
    return {output, rstd};
  }

  // grads: of (output, rstd).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto grads_in =
        row_norm_grads(ctx, /*center=*/false, /*fused=*/false, grads[0], Tensor(), grads[1]);
    return {grads_in[0], Tensor(), grads_in[1], Tensor()};
  }
};

// The fused ops normalize sum = input + residual: the row norm's gradient of
// sum, plus any that comes back through the returned sum, goes to both
// addends.
struct FusedAddLayerNormFunction : torch::autograd::Function<FusedAddLayerNormFunction> {
  static variable_list forward(
      AutogradContext* ctx,
      const Tensor& input,
      const Tensor& residual,
      c10::SymIntArrayRef normalized_shape,
      const OptionalTensor& weight,
      const OptionalTensor& bias,
      double eps) {
    auto [output, sum, mean, rstd] = call_below_autograd(
        ops().fused_add_layer_norm_forward, input, residual, normalized_shape, weight, bias, eps);
    save_row_norm(ctx, sum, normalized_shape, weight, bias, mean, rstd);
    return {output, sum, mean, rstd};
  }

  // grads: of (output, sum, mean, rstd).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto [grad_from_norm, grad_weight, grad_bias] =
        row_norm_grads(ctx, /*center=*/true, /*fused=*/true, grads[0], grads[2], grads[3]);
    const auto grad_sum = add_defined(grad_from_norm, grads[1]);
    return {ctx->needs_input_grad(0) ? grad_sum : Tensor(),
            ctx->needs_input_grad(1) ? grad_sum : Tensor(), Tensor(), grad_weight, grad_bias,
            Tensor()};
  }
};

struct FusedAddRmsNormFunction : torch::autograd::Function<FusedAddRmsNormFunction> {
  static variable_list forward(
      AutogradContext* ctx,
      const Tensor& input,
      const Tensor& residual,
      c10::SymIntArrayRef normalized_shape,
      const OptionalTensor& weight,
      double eps) {
    auto [output, sum, rstd] = call_below_autograd(
        ops().fused_add_rms_norm_forward, input, residual, normalized_shape, weight, eps);
    save_row_norm(ctx, sum, normalized_shape, weight, std::nullopt, Tensor(), rstd);
    return {output, sum, rstd};
  }

  // grads: of (output, sum, rstd).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto grads_in =
        row_norm_grads(ctx, /*center=*/false, /*fused=*/true, grads[0], Tensor(), grads[2]);
    const auto grad_sum = add_defined(grads_in[0], grads[1]);
    return {ctx->needs_input_grad(0) ? grad_sum : Tensor(),
            ctx->needs_input_grad(1) ? grad_sum : Tensor(), Tensor(), grads_in[1], Tensor()};
  }
};

// ---- BatchNorm --------------------------------------------------------------

struct BatchNormFunction : torch::autograd::Function<BatchNormFunction> {
  static variable_list forward(
      AutogradContext* ctx,
      const Tensor& input,
      const OptionalTensor& weight,
      const OptionalTensor& bias,
      const OptionalTensor& running_mean,
      const OptionalTensor& running_var,
      bool training,
      double momentum,
      double eps) {
    auto [output, save_mean, save_rstd, new_running_mean, new_running_var] = call_below_autograd(
        ops().batch_norm_forward, input, weight, bias, running_mean, running_var, training,
        momentum, eps);
    ctx->save_for_backward(
        {input, weight.value_or(Tensor()), bias.value_or(Tensor()), save_mean, save_rstd});
    ctx->saved_data["training"] = training;
    // The running statistics are state that the wrapper copies into the
    // buffers, not something to differentiate (nor are torch's).
    ctx->mark_non_differentiable({new_running_mean, new_running_var});
    ctx->set_materialize_grads(false);
    return {output, save_mean, save_rstd, new_running_mean, new_running_var};
  }

  // grads: of (output, save_mean, save_rstd; the running statistics get none).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& input = saved[0];
    const auto& weight = saved[1];
    const auto& bias = saved[2];
    const auto& save_mean = saved[3];
    const auto& save_rstd = saved[4];
    const bool training = ctx->saved_data.at("training").toBool();
    // The running statistics, the other tensor arguments, come after these.
    const auto mask = wanted_grads<3>(ctx, {true, weight.defined(), bias.defined()});
    std::array<Tensor, 3> g;
    if (grads[0].defined()) {
      const bool record = records_grad(grads[0], input, weight, bias, save_mean, save_rstd);
      std::tie(g[0], g[1], g[2]) = call_op(
          ops().batch_norm_backward, record, grads[0], input, optional_if_defined(weight),
          optional_if_defined(bias), save_mean, save_rstd, training, mask);
    }
    keep_masked(g, mask);
    // In training the returned batch statistics depend on the input (in eval
    // they are the running statistics).
    if (mask[0] && training) {
      c10::SymInt count = 1;
      for (int64_t d = 0; d < input.dim(); ++d) {
        if (d != 1) count = count * input.sym_size(d);
      }
      g[0] = add_defined(
          g[0],
          statistics_gradient(
              input, save_mean, save_rstd, grads[1], grads[2], input.dim() - 2, count));
    }
    // The op's parameter gradients have shape [C]; a parameter may have any
    // shape of C elements (torch checks the count only).
    return {g[0], g[1].defined() ? g[1].view_as(weight) : Tensor(),
            g[2].defined() ? g[2].view_as(bias) : Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor()};
  }
};

// ---- The Autograd kernels ----------------------------------------------------

Tensors3 layer_norm_forward_autograd(
    const Tensor& input,
    c10::SymIntArrayRef normalized_shape,
    const OptionalTensor& weight,
    const OptionalTensor& bias,
    double eps) {
  if (!records_grad(input, weight, bias)) {
    return call_below_autograd(
        ops().layer_norm_forward, input, normalized_shape, weight, bias, eps);
  }
  return as_tuple<3>(LayerNormFunction::apply(input, normalized_shape, weight, bias, eps));
}

Tensors2 rms_norm_forward_autograd(
    const Tensor& input,
    c10::SymIntArrayRef normalized_shape,
    const OptionalTensor& weight,
    double eps) {
  if (!records_grad(input, weight)) {
    return call_below_autograd(ops().rms_norm_forward, input, normalized_shape, weight, eps);
  }
  return as_tuple<2>(RmsNormFunction::apply(input, normalized_shape, weight, eps));
}

Tensors4 fused_add_layer_norm_forward_autograd(
    const Tensor& input,
    const Tensor& residual,
    c10::SymIntArrayRef normalized_shape,
    const OptionalTensor& weight,
    const OptionalTensor& bias,
    double eps) {
  if (!records_grad(input, residual, weight, bias)) {
    return call_below_autograd(
        ops().fused_add_layer_norm_forward, input, residual, normalized_shape, weight, bias, eps);
  }
  return as_tuple<4>(
      FusedAddLayerNormFunction::apply(input, residual, normalized_shape, weight, bias, eps));
}

Tensors3 fused_add_rms_norm_forward_autograd(
    const Tensor& input,
    const Tensor& residual,
    c10::SymIntArrayRef normalized_shape,
    const OptionalTensor& weight,
    double eps) {
  if (!records_grad(input, residual, weight)) {
    return call_below_autograd(
        ops().fused_add_rms_norm_forward, input, residual, normalized_shape, weight, eps);
  }
  return as_tuple<3>(
      FusedAddRmsNormFunction::apply(input, residual, normalized_shape, weight, eps));
}

Tensors5 batch_norm_forward_autograd(
    const Tensor& input,
    const OptionalTensor& weight,
    const OptionalTensor& bias,
    const OptionalTensor& running_mean,
    const OptionalTensor& running_var,
    bool training,
    double momentum,
    double eps) {
  if (!records_grad(input, weight, bias, running_mean, running_var)) {
    return call_below_autograd(
        ops().batch_norm_forward, input, weight, bias, running_mean, running_var, training,
        momentum, eps);
  }
  return as_tuple<5>(BatchNormFunction::apply(
      input, weight, bias, running_mean, running_var, training, momentum, eps));
}

}  // namespace

// The backward ops are not registered here: their autograd is Python's.
TORCH_LIBRARY_IMPL(layernorm_ext, Autograd, m) {
  m.impl("layer_norm_forward", &layer_norm_forward_autograd);
  m.impl("rms_norm_forward", &rms_norm_forward_autograd);
  m.impl("fused_add_layer_norm_forward", &fused_add_layer_norm_forward_autograd);
  m.impl("fused_add_rms_norm_forward", &fused_add_rms_norm_forward_autograd);
  m.impl("batch_norm_forward", &batch_norm_forward_autograd);
}

}  // namespace layernorm_ext
