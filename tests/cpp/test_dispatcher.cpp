// Calls the layernorm_ext ops of the layernorm_ext_ops library from C++,
// through the dispatcher only (no Python), and compares them with ATen's own
// LayerNorm and an RMSNorm built from ATen ops, both computed in float64 on the
// same random inputs (outputs, statistics and, via autograd, gradients), and
// the gradients that the forward ops' own autograd gives from C++.
// Exits 1, naming every case that failed, on any mismatch or missing op.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <cstdio>
#include <exception>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

using LayerNormForward =
    std::tuple<Tensor, Tensor, Tensor>(const Tensor&, c10::IntArrayRef, const OptionalTensor&,
                                       const OptionalTensor&, double);
using LayerNormBackward = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, c10::IntArrayRef, const Tensor&, const Tensor&,
    const OptionalTensor&, const OptionalTensor&, std::array<bool, 3>);
using RmsNormForward =
    std::tuple<Tensor, Tensor>(const Tensor&, c10::IntArrayRef, const OptionalTensor&, double);
using RmsNormBackward = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, c10::IntArrayRef,
                                                   const Tensor&, const OptionalTensor&,
                                                   std::array<bool, 2>);

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

struct Case {
  std::vector<int64_t> input_shape;
  std::vector<int64_t> normalized_shape;
  at::ScalarType dtype;
  bool affine;
  bool transposed;  // a non-contiguous view of the input

  // Against a float64 reference: float32 rounding, amplified a little by long rows.
  double tolerance() const {
    return dtype == at::kDouble ? 1e-10 : 1e-4;
  }

  std::string describe() const {
    std::ostringstream out;
    out << c10::toString(dtype) << " input " << c10::IntArrayRef(input_shape) << " normalized "
        << c10::IntArrayRef(normalized_shape) << (affine ? " with" : " without")
        << " weight/bias" << (transposed ? ", non-contiguous" : "");
    return out.str();
  }
};

struct Checker {
  int failures = 0;
  int checks = 0;

  // |actual - expected| <= atol + rtol * |expected| everywhere, computed in float64.
  void expect_close(const std::string& what, const Tensor& actual, const Tensor& expected,
                    double tolerance) {
    ++checks;
    if (actual.sizes() != expected.sizes()) {
      ++failures;
      std::ostringstream out;
      out << "FAIL " << what << ": shape " << actual.sizes() << ", expected "
          << expected.sizes();
      std::puts(out.str().c_str());
      return;
    }
    const auto actual64 = actual.to(at::kDouble);
    if (at::allclose(actual64, expected, tolerance, tolerance)) {
      return;
    }
    ++failures;
    const double max_error =
        actual64.numel() == 0 ? 0.0 : (actual64 - expected).abs().max().item<double>();
    std::printf("FAIL %s: max abs error %.3g exceeds tolerance %.3g\n", what.c_str(), max_error,
                tolerance);
  }
};

// A random input of the case's shape and dtype; transposed cases get a
// non-contiguous view whose values are just as random.
Tensor make_input(const Case& c) {
  if (!c.transposed) {
    return at::randn(c.input_shape, at::TensorOptions().dtype(c.dtype));
  }
  std::vector<int64_t> swapped = c.input_shape;
  std::swap(swapped[0], swapped[1]);
  return at::randn(swapped, at::TensorOptions().dtype(c.dtype)).transpose(0, 1);
}

std::vector<int64_t> normalized_dims(const Case& c) {
  std::vector<int64_t> dims;
  const auto rank = static_cast<int64_t>(c.input_shape.size());
  for (int64_t d = rank - static_cast<int64_t>(c.normalized_shape.size()); d < rank; ++d) {
    dims.push_back(d);
  }
  return dims;
}

// A random weight or bias of the case's normalized shape, or none.
OptionalTensor make_param(const Case& c) {
  return c.affine ? OptionalTensor(at::randn(c.normalized_shape, at::TensorOptions().dtype(c.dtype)))
                  : std::nullopt;
}

// A float64 copy for the reference computation, a leaf whose gradient autograd keeps.
Tensor reference_leaf(const Tensor& t) {
  return t.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true).requires_grad_();
}

OptionalTensor reference_leaf(const OptionalTensor& t) {
  return t ? OptionalTensor(reference_leaf(*t)) : std::nullopt;
}

// A leaf alias of an op's argument, so that autograd keeps its gradient.
Tensor leaf(const Tensor& t) {
  return t.detach().requires_grad_();
}

OptionalTensor leaf(const OptionalTensor& t) {
  return t ? OptionalTensor(leaf(*t)) : std::nullopt;
}

void check_layer_norm(Checker& checker, const Case& c) {
  static const auto forward = find_op<LayerNormForward>("layernorm_ext::layer_norm_forward");
  static const auto backward = find_op<LayerNormBackward>("layernorm_ext::layer_norm_backward");
  const double eps = 1e-5;
  const double tolerance = c.tolerance();
  const auto name = "layer_norm, " + c.describe();

  const auto input = make_input(c);
  const auto weight = make_param(c);
  const auto bias = make_param(c);
  const auto [output, mean, rstd] = forward.call(input, c.normalized_shape, weight, bias, eps);

  const auto input64 = reference_leaf(input);
  const auto weight64 = reference_leaf(weight);
  const auto bias64 = reference_leaf(bias);
  const auto expected = at::layer_norm(input64, c.normalized_shape, weight64, bias64, eps);
  checker.expect_close(name + ": output", output, expected.detach(), tolerance);

  const auto dims = normalized_dims(c);
  const auto plain = input64.detach();
  checker.expect_close(name + ": mean", mean, plain.mean(dims), tolerance);
  const auto biased_var = (plain - plain.mean(dims, /*keepdim=*/true)).square().mean(dims);
  checker.expect_close(name + ": rstd", rstd, (biased_var + eps).rsqrt(), tolerance);

  const auto grad_output = at::randn(input.sizes(), input.options());
  expected.backward(grad_output.to(at::kDouble));
  const auto [grad_input, grad_weight, grad_bias] =
      backward.call(grad_output, input, c.normalized_shape, mean, rstd, weight, bias,
                    {true, c.affine, c.affine});
  checker.expect_close(name + ": grad_input", grad_input, input64.grad(), tolerance);
  if (c.affine) {
    checker.expect_close(name + ": grad_weight", grad_weight, weight64->grad(), tolerance);
    checker.expect_close(name + ": grad_bias", grad_bias, bias64->grad(), tolerance);
  }

  // The forward op's own autograd (csrc/autograd_forward_ops.cpp) works without Python.
  const auto input_leaf = leaf(input);
  const auto weight_leaf = leaf(weight);
  std::get<0>(forward.call(input_leaf, c.normalized_shape, weight_leaf, bias, eps))
      .backward(grad_output);
  checker.expect_close(name + ": autograd grad_input", input_leaf.grad(), input64.grad(),
                       tolerance);
  if (c.affine) {
    checker.expect_close(name + ": autograd grad_weight", weight_leaf->grad(), weight64->grad(),
                         tolerance);
  }
}

void check_rms_norm(Checker& checker, const Case& c) {
  static const auto forward = find_op<RmsNormForward>("layernorm_ext::rms_norm_forward");
  static const auto backward = find_op<RmsNormBackward>("layernorm_ext::rms_norm_backward");
  const double eps = 1e-6;
  const double tolerance = c.tolerance();
  const auto name = "rms_norm, " + c.describe();

  const auto input = make_input(c);
  const auto weight = make_param(c);
  const auto [output, rstd] = forward.call(input, c.normalized_shape, weight, eps);

  // y = x / sqrt(mean(x^2) + eps) * weight, from ATen ops in float64.
  const auto input64 = reference_leaf(input);
  const auto weight64 = reference_leaf(weight);
  const auto dims = normalized_dims(c);
  const auto expected_rstd = (input64.square().mean(dims, /*keepdim=*/true) + eps).rsqrt();
  auto expected = input64 * expected_rstd;
  if (weight64) {
    expected = expected * *weight64;
  }
  checker.expect_close(name + ": output", output, expected.detach(), tolerance);
  checker.expect_close(name + ": rstd", rstd,
                       (input64.detach().square().mean(dims) + eps).rsqrt(), tolerance);

  const auto grad_output = at::randn(input.sizes(), input.options());
  expected.backward(grad_output.to(at::kDouble));
  const auto [grad_input, grad_weight] =
      backward.call(grad_output, input, c.normalized_shape, rstd, weight, {true, c.affine});
  checker.expect_close(name + ": grad_input", grad_input, input64.grad(), tolerance);
  if (c.affine) {
    checker.expect_close(name + ": grad_weight", grad_weight, weight64->grad(), tolerance);
  }

  const auto input_leaf = leaf(input);
  std::get<0>(forward.call(input_leaf, c.normalized_shape, weight, eps)).backward(grad_output);
  checker.expect_close(name + ": autograd grad_input", input_leaf.grad(), input64.grad(),
                       tolerance);
}

}  // namespace

int main() {
  at::manual_seed(20240611);
  Checker checker;
  try {
    for (const auto dtype : {at::kFloat, at::kDouble}) {
      for (const bool affine : {true, false}) {
        const std::vector<Case> cases = {
            {{7, 33}, {33}, dtype, affine, false},
            {{3, 5, 17}, {5, 17}, dtype, affine, false},
            {{1, 65537}, {65537}, dtype, affine, false},
            {{0, 8}, {8}, dtype, affine, false},
            {{31, 6, 9}, {9}, dtype, affine, true},
        };
        for (const auto& c : cases) {
          check_layer_norm(checker, c);
          check_rms_norm(checker, c);
        }
      }
    }
  } catch (const std::exception& error) {
    std::printf("FAIL: %s\n", error.what());
    return 1;
  }
  if (checker.failures > 0) {
    std::printf("%d of %d checks failed\n", checker.failures, checker.checks);
    return 1;
  }
  std::printf("all %d checks passed\n", checker.checks);
  return 0;
}
