// BatchNorm kernels on the CPU: statistics per channel over the batch and
// spatial dims, y = (x - mean_c) * rstd_c * weight_c + bias_c, and the
// gradients.
//
// Layout: an (N, C, *) tensor is seen as outer x channels x inner, element
// (o, c, i) at offset (o * channels + c) * inner + i. A contiguous NCHW input
// is (N, C, H*W): every (n, c) is a plane of `inner` contiguous elements of
// one channel, and the loops run along planes with the channel's
// coefficients in registers. A channels-last input (and a 2-D one) is
// (N*H*W, C, 1): rows of C contiguous channels, and the loops run along rows
// with one SIMD lane per channel. Either way memory is read in address
// order, and a channel's data is never gathered with a stride. (A contiguous
// input with C = 1 is one plane, which splits evenly across threads.)
//
// This header is the interface: the layout, the argument blocks, and
// batch_norm_forward / batch_norm_backward, which call the kernels compiled
// for the SIMD level in use (simd_level.h). The kernels themselves, and how
// they split work, keep their bits whatever the thread count and move
// memory, are in batch_norm_kernels_impl.h and its layout files
// (batch_norm_plane_layout_impl.h, batch_norm_row_layout_impl.h).
#pragma once

#include "../op_arguments.h"
#include "simd_level.h"
#include "simd_targets.h"

#include <cstdint>

namespace layernorm_ext::cpu {

struct ChannelLayout {
  int64_t outer;
  int64_t channels;
  int64_t inner;  // 1: row layout (channels contiguous); > 1: plane layout
};

// The per-channel arrays (channels values each) are in acc_t<T>, whatever
// the dtype of the op's parameters: the op converts them, a few bytes a
// channel, so that one kernel per input dtype serves every parameter dtype.
template <typename T>
struct BatchNormForwardArgs {
  const T* input;
  T* output;
  const acc_t<T>* weight;  // null: no affine weight
  const acc_t<T>* bias;  // null: no affine bias
  // Eval: the statistics that normalize. Training: the old running
  // statistics when they are updated, else null.
  const acc_t<T>* running_mean;
  const acc_t<T>* running_var;
  // Training: the batch mean and 1 / sqrt(var + eps); eval: the running ones.
  acc_t<T>* save_mean;
  acc_t<T>* save_rstd;
  // Training with running statistics: their momentum update; else null.
  acc_t<T>* new_running_mean;
  acc_t<T>* new_running_var;
  ChannelLayout layout;
  bool training;
  double momentum;
  double eps;
};

// Training: gradients through the batch statistics, dx = w * rstd * (dy -
// mean(dy) - (x - mean) * rstd^2 * mean(dy * (x - mean))). Eval: the
// statistics are constants, dx = w * rstd * dy.
template <typename T>
struct BatchNormBackwardArgs {
  const T* grad_output;
  const T* input;
  const acc_t<T>* weight;  // null: no affine weight
  const acc_t<T>* mean;  // save_mean and save_rstd of the forward
  const acc_t<T>* rstd;
  // Each gradient is null when it is not asked for.
  T* grad_input;
  acc_t<T>* grad_weight;
  acc_t<T>* grad_bias;
  ChannelLayout layout;
  bool training;
};

// One declaration per compiled instruction set; the definitions (explicit
// instantiations for float, double, Half and BFloat16) are in
// kernels_<isa>.cpp.
#define LAYERNORM_EXT_DECLARE_BATCH_NORM_KERNELS(isa)                \
  namespace isa {                                                     \
  template <typename T>                                               \
  void batch_norm_forward(const BatchNormForwardArgs<T>& args);       \
  template <typename T>                                               \
  void batch_norm_backward(const BatchNormBackwardArgs<T>& args);     \
  }
LAYERNORM_EXT_DECLARE_BATCH_NORM_KERNELS(portable)
#if LAYERNORM_EXT_X86_SIMD
LAYERNORM_EXT_DECLARE_BATCH_NORM_KERNELS(avx2)
LAYERNORM_EXT_DECLARE_BATCH_NORM_KERNELS(avx512)
#endif
#undef LAYERNORM_EXT_DECLARE_BATCH_NORM_KERNELS

template <typename T>
void batch_norm_forward(const BatchNormForwardArgs<T>& args) {
  switch (active_simd_level()) {
#if LAYERNORM_EXT_X86_SIMD
    case SimdLevel::kAvx512:
      return avx512::batch_norm_forward(args);
    case SimdLevel::kAvx2:
      return avx2::batch_norm_forward(args);
#endif
    default:
      return portable::batch_norm_forward(args);
  }
}

template <typename T>
void batch_norm_backward(const BatchNormBackwardArgs<T>& args) {
  switch (active_simd_level()) {
#if LAYERNORM_EXT_X86_SIMD
    case SimdLevel::kAvx512:
      return avx512::batch_norm_backward(args);
    case SimdLevel::kAvx2:
      return avx2::batch_norm_backward(args);
#endif
    default:
      return portable::batch_norm_backward(args);
  }
}

} // namespace layernorm_ext::cpu
