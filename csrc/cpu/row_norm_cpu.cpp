// The CPU kernels of the LayerNorm and RMSNorm ops (row_norm_ops.h writes the
// ops once for every backend): dtype dispatch to the row kernels of
// row_norm_kernels.h. The kernels take the parameters in the accumulation
// type, converted here (`cols` values, ones or zeros for an absent one), and
// sum the parameter gradients in it.
#include "../row_norm_ops.h"
#include "row_norm_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace layernorm_ext::cpu {
namespace {

// A weight or bias as `cols` contiguous acc_type values: the tensor itself
// when it already is, a converted copy otherwise, and `fill` (1 for a weight,
// 0 for a bias, exact no-ops) when the op has none.
at::Tensor param_as_acc(
    const std::optional<at::Tensor>& param, int64_t cols, at::ScalarType acc_type, double fill) {
  if (param.has_value()) return param->to(acc_type).contiguous();
  return at::full({cols}, fill, at::TensorOptions().dtype(acc_type));
}

// Where the kernel sums a parameter gradient: the gradient itself when it is
// in acc_type, else scratch copied into it afterwards (copy_back). Undefined
// when not asked for.
at::Tensor acc_grad(const at::Tensor& grad, at::ScalarType acc_type) {
  if (!grad.defined() || grad.scalar_type() == acc_type) return grad;
  return at::empty(grad.sizes(), grad.options().dtype(acc_type));
}

void copy_back(const at::Tensor& grad, const at::Tensor& acc) {
  if (grad.defined() && !grad.is_same(acc)) grad.copy_(acc);
}

// Scratch for the block partial rows of the weight/bias gradients (see
// RowNormBackwardArgs::partials).
at::Tensor grad_partials(const RowShape& shape, int64_t partial_rows, at::ScalarType acc_type) {
  const int64_t acc_bytes = static_cast<int64_t>(c10::elementSize(acc_type));
  const int64_t blocks =
      partial_rows > 0 ? grad_blocks(shape.rows, shape.cols, partial_rows * acc_bytes) : 0;
  return at::empty({blocks * partial_rows * shape.cols}, at::TensorOptions().dtype(acc_type));
}

// The forward of a channels-first input seen channels-last
// (row_norm_ops::is_channels_first_view, timm's LayerNorm2d): row
// image * plane + position holds that position's channels, `plane` elements
// apart. Tiles of consecutive positions of one image are gathered into
// contiguous rows, each channel's run of the tile read in one go, and the row
// kernel normalizes them into the contiguous output. So the output has the
// bits the contiguous input's would have, without a copy of the whole input:
// a tile's rows (kTileBytes, within L2) are written and read back in cache.
template <bool kCenter, typename T>
void channels_first_forward(const RowNormForwardArgs<T>& args, int64_t images) {
  constexpr int64_t kTileBytes = int64_t{256} << 10;
  const int64_t channels = args.cols;
  const int64_t plane = args.rows / images;
  const int64_t tile = std::clamp<int64_t>(
      kTileBytes / (channels * static_cast<int64_t>(sizeof(T))) / 16 * 16, 16, 256);
  const int64_t tiles_per_image = (plane + tile - 1) / tile;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (tile * channels));
  at::parallel_for(0, images * tiles_per_image, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> rows(tile * channels);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t image = t / tiles_per_image;
      const int64_t first = t % tiles_per_image * tile;
      const int64_t count = std::min(tile, plane - first);
      const T* positions = args.input + image * channels * plane + first;
      for (int64_t c = 0; c < channels; ++c) {
        const T* run = positions + c * plane;
        for (int64_t p = 0; p < count; ++p) rows[p * channels + c] = run[p];
      }
      const int64_t row = image * plane + first;
      RowNormForwardArgs<T> part = args;
      part.input = rows.data();
      part.output = args.output + row * channels;
      if (part.mean) part.mean = args.mean + row;
      part.rstd = args.rstd + row;
      part.rows = count;
      row_norm_forward<kCenter>(part);  // one task: runs inline
    }
  });
}

struct RowNormCpuKernels {
  // See channels_first_forward.
  static constexpr bool kReadsChannelsFirst = true;

  template <bool kCenter>
  static void forward(const RowNormForward& call) {
    const auto acc_type = accumulate_type(call.input.scalar_type());
    const auto weight = param_as_acc(call.weight, call.shape.cols, acc_type, 1);
    const auto bias = param_as_acc(call.bias, call.shape.cols, acc_type, 0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.input.scalar_type(), "row_norm_forward", [&] {
      using acc = acc_t<scalar_t>;
      const RowNormForwardArgs<scalar_t> args{
          call.input.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(call.residual),
          weight.const_data_ptr<acc>(), bias.const_data_ptr<acc>(),
          call.output.mutable_data_ptr<scalar_t>(), mutable_data_or_null<scalar_t>(call.sum),
          mutable_data_or_null<acc>(call.mean), call.rstd.mutable_data_ptr<acc>(),
          call.shape.rows, call.shape.cols, call.eps};
      if (call.input.is_contiguous()) {
        row_norm_forward<kCenter>(args);
      } else {
        channels_first_forward<kCenter>(args, call.input.size(0));
      }
    });
  }

  template <bool kCenter>
  static void backward(const RowNormBackward& call) {
    const auto acc_type = accumulate_type(call.input.scalar_type());
    const auto weight = param_as_acc(call.weight, call.shape.cols, acc_type, 1);
    const auto grad_weight = acc_grad(call.grad_weight, acc_type);
    const auto grad_bias = acc_grad(call.grad_bias, acc_type);
    const auto partials = grad_partials(
        call.shape, int64_t{grad_weight.defined()} + int64_t{grad_bias.defined()}, acc_type);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.input.scalar_type(), "row_norm_backward", [&] {
      using acc = acc_t<scalar_t>;
      row_norm_backward<kCenter>(RowNormBackwardArgs<scalar_t>{
          call.grad_output.const_data_ptr<scalar_t>(), call.input.const_data_ptr<scalar_t>(),
          data_or_null<acc>(call.mean), call.rstd.const_data_ptr<acc>(),
          weight.const_data_ptr<acc>(), mutable_data_or_null<scalar_t>(call.grad_input),
          mutable_data_or_null<acc>(grad_weight), mutable_data_or_null<acc>(grad_bias),
          partials.mutable_data_ptr<acc>(), call.shape.rows, call.shape.cols});
    });
    copy_back(call.grad_weight, grad_weight);
    copy_back(call.grad_bias, grad_bias);
  }
};

} // namespace

TORCH_LIBRARY_IMPL(layernorm_ext, CPU, m) {
  register_row_norm_ops<RowNormCpuKernels>(m);
}

} // namespace layernorm_ext::cpu
