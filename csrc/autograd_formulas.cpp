#include "autograd_formulas.h"

namespace layernorm_ext::autograd_formulas {
namespace {

using at::Tensor;

Tensor or_zeros(const Tensor& t, const Tensor& like) {
  return t.defined() ? t.to(like.scalar_type()) : at::zeros_like(like);
}

// `t` at the full shape of `like` (a term may only broadcast to it, such as a
// bias's tangent alone), in `dtype`.
Tensor full_like(const Tensor& t, const Tensor& like, at::ScalarType dtype) {
  const Tensor full = t.sym_sizes() == like.sym_sizes()
      ? t
      : t.expand_symint(like.sym_sizes()).contiguous(like.suggest_memory_format());
  return full.to(dtype);
}

// Sums over `dims`; none to sum over leaves t as it is (at::sum over an empty
// dim list would sum everything).
Tensor sum_over(const Tensor& t, const std::vector<int64_t>& dims) {
  return dims.empty() ? t : t.sum(dims);
}

// The quantities every formula starts from, in the accumulation dtype (the
// statistics'): the input centered (or not) and normalized, the parameter
// broadcast, g = grad_output * weight when there is a grad_output.
struct Normalized {
  Normalized(const Norm& norm, const Tensor& input, const Tensor& mean, const Tensor& rstd,
             const Tensor& weight)
      : acc(rstd.scalar_type()),
        centered(norm.center ? input.to(acc) - norm.groups.stat(mean) : input.to(acc)),
        rstd(norm.groups.stat(rstd)),
        xhat(centered * this->rstd),
        weight(weight.defined() ? norm.groups.param(weight).to(acc) : Tensor()) {}

  Tensor scaled(const Tensor& t) const { return weight.defined() ? t * weight : t; }

  at::ScalarType acc;
  Tensor centered, rstd, xhat, weight;
};

}  // namespace

Tensor add_defined(const Tensor& a, const Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a + b;
}

Groups Groups::rows(int64_t dim, int64_t normalized_dims) {
  Groups groups;
  for (int64_t d = 0; d < dim; ++d) {
    (d < dim - normalized_dims ? groups.param_dims : groups.group_dims).push_back(d);
  }
  groups.stat_unit_dims = normalized_dims;
  return groups;
}

Groups Groups::channels(int64_t dim) {
  Groups groups;
  groups.per_channel = true;
  // A 1-D input has no channel dim: C = 0, and the checks pass it only empty,
  // with statistics of its own shape [0], so no dim is reduced.
  if (dim < 2) return groups;
  for (int64_t d = 0; d < dim; ++d) {
    if (d != 1) groups.group_dims.push_back(d);
  }
  groups.param_dims = groups.group_dims;
  groups.stat_unit_dims = dim - 2;
  return groups;
}

Tensor Groups::stat(const Tensor& stat) const {
  Tensor out = stat;
  for (int64_t i = 0; i < stat_unit_dims; ++i) out = out.unsqueeze(-1);
  return out;
}

Tensor Groups::param(const Tensor& param) const {
  // A BatchNorm parameter may have any shape of C elements (torch checks the
  // count only); a row norm's is shaped like the normalized dims.
  return per_channel ? stat(param.reshape({-1})) : param;
}

Tensor Groups::group_mean(const Tensor& t) const {
  return group_dims.empty() ? t : t.mean(group_dims);
}

c10::SymInt Groups::count(const Tensor& input) const {
  c10::SymInt count = 1;
  for (const int64_t d : group_dims) count = count * input.sym_size(d);
  return count;
}

Tensor Groups::group_sum(const Tensor& t) const {
  return sum_over(t, group_dims);
}

Tensor Groups::param_sum(const Tensor& t, const Tensor& param) const {
  return sum_over(t, param_dims).reshape_symint(param.sym_sizes());
}

Tensor statistics_gradient(
    const Norm& norm,
    const Tensor& input,
    const Tensor& mean,
    const Tensor& rstd,
    const Tensor& grad_mean,
    const Tensor& grad_rstd) {
  if (!grad_mean.defined() && !grad_rstd.defined()) return Tensor();
  const auto& groups = norm.groups;
  const auto x = input.to(rstd.scalar_type());
  // The rstd term has the input's shape; the mean term only broadcasts to it.
  auto grad = grad_rstd.defined()
      ? groups.stat(-grad_rstd * rstd.pow(3)) * (mean.defined() ? x - groups.stat(mean) : x)
      : at::zeros_like(x);
  if (grad_mean.defined()) grad = grad + groups.stat(grad_mean);
  return grad.div(c10::Scalar(groups.count(input))).to(input.scalar_type());
}

ForwardTangents forward_tangents(
    const Norm& norm,
    const Tensor& input,
    const Tensor& mean,
    const Tensor& rstd,
    const Tensor& weight,
    const Tensor& input_tangent,
    const Tensor& weight_tangent,
    const Tensor& bias_tangent,
    at::ScalarType output_dtype) {
  const auto& groups = norm.groups;
  const Normalized n(norm, input, mean, rstd, weight);
  ForwardTangents tangents;
  Tensor output;
  if (input_tangent.defined()) {
    // d xhat = rstd * (dx - d mean - xhat * c), c = mean(xhat * dx); with
    // given statistics, rstd * dx.
    auto dx = input_tangent.to(n.acc);
    if (norm.batch_stats) {
      const auto c = groups.group_mean(dx * n.xhat);
      tangents.rstd = -rstd * rstd * c;
      if (norm.center) {
        tangents.mean = groups.group_mean(dx);
        dx = dx - groups.stat(tangents.mean);
      }
      dx = dx - n.xhat * groups.stat(c);
    }
    output = n.scaled(dx * n.rstd);
  }
  if (weight_tangent.defined()) {
    output = add_defined(output, n.xhat * groups.param(weight_tangent).to(n.acc));
  }
  if (bias_tangent.defined()) {
    output = add_defined(output, groups.param(bias_tangent).to(n.acc));
  }
  if (output.defined()) tangents.output = full_like(output, input, output_dtype);
  return tangents;
}

std::array<Tensor, 5> backward_gradients(
    const Norm& norm,
    const BackwardInputs& saved,
    const Tensor& grad_grad_input,
    const Tensor& grad_grad_weight,
    const Tensor& grad_grad_bias) {
  const auto& groups = norm.groups;
  const Normalized n(norm, saved.input, saved.mean, saved.rstd, saved.weight);
  const auto go = saved.grad_output.to(n.acc);
  const auto g = n.scaled(go);

  // d_g, d_xhat: the gradients of g and of xhat (rstd held); d_rstd: of
  // rstd, xhat held, until the path through xhat is added below.
  Tensor d_g, d_xhat, d_rstd;
  if (grad_grad_input.defined()) {
    const auto gx = grad_grad_input.to(n.acc);
    d_g = gx;
    d_rstd = groups.group_sum(gx * g);
    if (norm.batch_stats) {
      const c10::Scalar count(groups.count(saved.input));
      const auto b = groups.group_mean(g * n.xhat);
      const auto s2 = groups.group_mean(gx * n.xhat);
      d_g = d_g - n.xhat * groups.stat(s2);
      d_xhat = -(g * groups.stat(s2) + groups.stat(b) * gx) * n.rstd;
      d_rstd = d_rstd - (b * s2).mul(count);
      if (norm.center) {
        const auto s1 = groups.group_mean(gx);
        d_g = d_g - groups.stat(s1);
        d_rstd = d_rstd - (groups.group_mean(g) * s1).mul(count);
      }
    }
    d_g = d_g * n.rstd;
  }
  Tensor d_grad_output = d_g.defined() ? n.scaled(d_g) : Tensor();
  if (grad_grad_weight.defined()) {
    const auto gw = groups.param(grad_grad_weight).to(n.acc);
    d_xhat = add_defined(d_xhat, gw * go);
    d_grad_output = add_defined(d_grad_output, gw * n.xhat);
  }
  if (grad_grad_bias.defined()) {
    d_grad_output = add_defined(d_grad_output, groups.param(grad_grad_bias).to(n.acc));
  }

  std::array<Tensor, 5> grads;  // grad_output, input, mean, rstd, weight
  if (d_grad_output.defined()) {
    grads[0] = full_like(d_grad_output, saved.grad_output, saved.grad_output.scalar_type());
  }
  if (d_xhat.defined()) {
    grads[1] = (d_xhat * n.rstd).to(saved.input.scalar_type());
    if (norm.center) grads[2] = -groups.group_sum(d_xhat * n.rstd);
    d_rstd = add_defined(d_rstd, groups.group_sum(d_xhat * n.centered));
  }
  grads[3] = d_rstd;
  if (saved.weight.defined() && d_g.defined()) {
    grads[4] = groups.param_sum(d_g * go, saved.weight).to(saved.weight.scalar_type());
  }
  return grads;
}

std::array<Tensor, 3> backward_tangents(
    const Norm& norm,
    const BackwardInputs& primals,
    const Tensor& bias,
    const BackwardInputs& tangents,
    const std::array<bool, 3>& wanted) {
  const auto& groups = norm.groups;
  const Normalized n(norm, primals.input, primals.mean, primals.rstd, primals.weight);
  const auto go = primals.grad_output.to(n.acc);
  const auto g = n.scaled(go);
  const auto d_go = or_zeros(tangents.grad_output, go);
  // d xhat = (dx - d mean) * rstd + (x - mean) * d rstd
  auto d_xhat = or_zeros(tangents.input, go) * n.rstd;
  if (norm.center && tangents.mean.defined()) {
    d_xhat = d_xhat - groups.stat(tangents.mean.to(n.acc)) * n.rstd;
  }
  if (tangents.rstd.defined()) {
    d_xhat = d_xhat + n.centered * groups.stat(tangents.rstd.to(n.acc));
  }
  auto d_g = n.scaled(d_go);
  if (primals.weight.defined() && tangents.weight.defined()) {
    d_g = d_g + go * groups.param(tangents.weight).to(n.acc);
  }

  std::array<Tensor, 3> out;  // grad_input, grad_weight, grad_bias
  if (wanted[0]) {
    // grad_input = rstd * inner
    Tensor inner = g, d_inner = d_g;
    if (norm.batch_stats) {
      const auto b = groups.group_mean(g * n.xhat);
      const auto d_b = groups.group_mean(d_g * n.xhat + g * d_xhat);
      inner = inner - n.xhat * groups.stat(b);
      d_inner = d_inner - d_xhat * groups.stat(b) - n.xhat * groups.stat(d_b);
      if (norm.center) {
        inner = inner - groups.stat(groups.group_mean(g));
        d_inner = d_inner - groups.stat(groups.group_mean(d_g));
      }
    }
    auto d_grad_input = n.rstd * d_inner;
    if (tangents.rstd.defined()) {
      d_grad_input = d_grad_input + groups.stat(tangents.rstd.to(n.acc)) * inner;
    }
    out[0] = d_grad_input.to(primals.input.scalar_type());
  }
  if (wanted[1] && primals.weight.defined()) {
    const auto d_grad_weight = sum_over(d_go * n.xhat + go * d_xhat, groups.param_dims);
    out[1] = d_grad_weight.to(primals.weight.scalar_type());
  }
  if (wanted[2] && bias.defined()) {
    out[2] = sum_over(d_go, groups.param_dims).to(bias.scalar_type());
  }
  return out;
}

}  // namespace layernorm_ext::autograd_formulas
