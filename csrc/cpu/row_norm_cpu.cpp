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

// Inputs that are channels-first tensors seen channels-last
// (row_norm_ops::is_channels_first_view, timm's LayerNorm2d): row
// image * plane + position holds that position's channels, `plane` elements
// apart. The kernels take them in tiles of consecutive positions of one
// image, gathered into contiguous rows (each channel's run of the tile read
// in one go) that the row kernels then take as they take any rows: so the
// output and grad_input rows have the bits a contiguous input's would have,
// without a copy of the whole input, a tile's rows (kTileBytes, within L2)
// written and read back in cache.
struct ChannelsFirstTiles {
  static constexpr int64_t kTileBytes = int64_t{256} << 10;
  int64_t images, plane, channels, tile, per_image;

  ChannelsFirstTiles(int64_t rows, int64_t channels, int64_t images, int64_t element_bytes)
      : images(images), plane(rows / images), channels(channels) {
    tile = std::clamp<int64_t>(kTileBytes / (channels * element_bytes) / 16 * 16, 16, 256);
    per_image = (plane + tile - 1) / tile;
  }
  int64_t count() const { return images * per_image; }
  int64_t grain() const { return std::max<int64_t>(1, kGrainElements / (tile * channels)); }
  int64_t first_row(int64_t t) const { return t / per_image * plane + t % per_image * tile; }
  int64_t rows(int64_t t) const { return std::min(tile, plane - t % per_image * tile); }

  // Tile t's rows of `data` (a channels-first view, or contiguous rows) as
  // contiguous rows: gathered into `buffer`, or where they already are.
  template <typename T>
  const T* gather(const T* data, bool contiguous, int64_t t, std::vector<T>& buffer) const {
    const int64_t row = first_row(t);
    if (contiguous) return data + row * channels;
    const int64_t count = rows(t);
    buffer.resize(tile * channels);
    const T* positions = data + t / per_image * channels * plane + t % per_image * tile;
    for (int64_t c = 0; c < channels; ++c) {
      const T* run = positions + c * plane;
      for (int64_t p = 0; p < count; ++p) buffer[p * channels + c] = run[p];
    }
    return buffer.data();
  }
};

template <bool kCenter, typename T>
void channels_first_forward(const RowNormForwardArgs<T>& args, int64_t images) {
  const ChannelsFirstTiles tiles(args.rows, args.cols, images, sizeof(T));
  at::parallel_for(0, tiles.count(), tiles.grain(), [&](int64_t begin, int64_t end) {
    std::vector<T> rows;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = tiles.first_row(t);
      RowNormForwardArgs<T> part = args;
      part.input = tiles.gather(args.input, false, t, rows);
      part.output = args.output + row * args.cols;
      if (part.mean) part.mean = args.mean + row;
      part.rstd = args.rstd + row;
      part.rows = tiles.rows(t);
      row_norm_forward<kCenter>(part);  // one task: runs inline
    }
  });
}

// The backward of the same, input or grad_output (or both) a channels-first
// view: each tile's grad_input rows as the row kernel gives them; its weight
// and bias gradients summed per tile, and the tiles' sums added in double in
// tile order (a function of the shape, so the bits do not depend on the
// thread count).
template <bool kCenter, typename T>
void channels_first_backward(
    const RowNormBackwardArgs<T>& args,
    int64_t images,
    bool input_contiguous,
    bool grad_output_contiguous) {
  using acc = acc_t<T>;
  const int64_t cols = args.cols;
  const ChannelsFirstTiles tiles(args.rows, cols, images, sizeof(T));
  const int64_t partial_rows = (args.grad_weight ? 1 : 0) + (args.grad_bias ? 1 : 0);
  // Per tile, its grad_weight row then its grad_bias row.
  std::vector<acc> tile_sums(tiles.count() * partial_rows * cols);
  const int64_t blocks =
      partial_rows > 0 ? grad_blocks(tiles.tile, cols, partial_rows * sizeof(acc)) : 0;
  at::parallel_for(0, tiles.count(), tiles.grain(), [&](int64_t begin, int64_t end) {
    std::vector<T> input_rows, grad_rows;
    std::vector<acc> partials(blocks * partial_rows * cols);
    for (int64_t t = begin; t < end; ++t) {
      RowNormBackwardArgs<T> part = args;
      const int64_t row = tiles.first_row(t);
      part.input = tiles.gather(args.input, input_contiguous, t, input_rows);
      part.grad_output = tiles.gather(args.grad_output, grad_output_contiguous, t, grad_rows);
      if (part.mean) part.mean = args.mean + row;
      part.rstd = args.rstd + row;
      if (part.grad_input) part.grad_input = args.grad_input + row * cols;
      acc* sums = tile_sums.data() + t * partial_rows * cols;
      if (part.grad_weight) part.grad_weight = sums;
      if (part.grad_bias) part.grad_bias = sums + (args.grad_weight ? cols : 0);
      part.partials = partials.data();
      part.rows = tiles.rows(t);
      row_norm_backward<kCenter>(part);  // one task: runs inline
    }
  });
  for (int64_t k = 0; k < partial_rows; ++k) {
    acc* grad = k == 0 && args.grad_weight ? args.grad_weight : args.grad_bias;
    for (int64_t c = 0; c < cols; ++c) {
      double total = 0;
      for (int64_t t = 0; t < tiles.count(); ++t) total += tile_sums[(t * partial_rows + k) * cols + c];
      grad[c] = static_cast<acc>(total);
    }
  }
}

struct RowNormCpuKernels {
  // See ChannelsFirstTiles.
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
    const bool rows_contiguous = call.input.is_contiguous() && call.grad_output.is_contiguous();
    // channels_first_backward keeps scratch of its own.
    const auto partials = rows_contiguous
        ? grad_partials(call.shape, int64_t{grad_weight.defined()} + int64_t{grad_bias.defined()}, acc_type)
        : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.input.scalar_type(), "row_norm_backward", [&] {
      using acc = acc_t<scalar_t>;
      const RowNormBackwardArgs<scalar_t> args{
          call.grad_output.const_data_ptr<scalar_t>(), call.input.const_data_ptr<scalar_t>(),
          data_or_null<acc>(call.mean), call.rstd.const_data_ptr<acc>(),
          weight.const_data_ptr<acc>(), mutable_data_or_null<scalar_t>(call.grad_input),
          mutable_data_or_null<acc>(grad_weight), mutable_data_or_null<acc>(grad_bias),
          mutable_data_or_null<acc>(partials), call.shape.rows, call.shape.cols};
      if (rows_contiguous) {
        row_norm_backward<kCenter>(args);
      } else {
        channels_first_backward<kCenter>(
            args, call.input.size(0), call.input.is_contiguous(), call.grad_output.is_contiguous());
      }
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
