// The schema of every layernorm_ext op, defined once. Each backend registers
// its kernels in its own file (cpu/*.cpp, cuda/*_cuda.cpp) with
// TORCH_LIBRARY_IMPL; the forward ops' autograd is C++ too, one kernel for
// every backend (autograd.cpp). Fake (meta) kernels, and the autograd formulas
// of the backward ops (double backward), are registered from Python, next to
// each op's wrapper (layernorm_ext/<op>.py).
//
// Conventions shared by all ops:
//  - statistics (mean, rstd) are returned in the accumulation type: float64 for
//    float64 input, float32 for everything else, shaped like the input's
//    non-normalized (batch) dims;
//  - BatchNorm statistics are per channel (dim 1), shape [C];
//  - normalized_shape is SymInt[], as in aten::native_layer_norm: under
//    torch.compile(dynamic=True) the sizes are symbolic, and the C++ autograd
//    kernels must take and pass them on as SymInts (backend kernels may take
//    int64 sizes: the dispatcher converts concrete ones);
//  - no op mutates its arguments: batch_norm_forward returns the updated
//    running statistics and the Python wrapper copies them into the buffers
//    (aten::copy_), so that autograd, functionalization and opcheck see pure
//    functions;
//  - backward ops take an output_mask and return an empty tensor of shape [0]
//    for every gradient that was not asked for, so that every output is a
//    defined Tensor (what opcheck and the fake-tensor machinery expect).
#include <torch/library.h>

TORCH_LIBRARY(layernorm_ext, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def(
      "layer_norm_forward(Tensor input, SymInt[] normalized_shape, Tensor? weight, "
      "Tensor? bias, float eps) -> (Tensor output, Tensor mean, Tensor rstd)",
      tags);
  m.def(
      "layer_norm_backward(Tensor grad_output, Tensor input, SymInt[] normalized_shape, "
      "Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
      tags);
  m.def(
      "rms_norm_forward(Tensor input, SymInt[] normalized_shape, Tensor? weight, "
      "float eps) -> (Tensor output, Tensor rstd)",
      tags);
  m.def(
      "rms_norm_backward(Tensor grad_output, Tensor input, SymInt[] normalized_shape, "
      "Tensor rstd, Tensor? weight, bool[2] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight)",
      tags);
  // training: normalizes with the batch's biased variance; save_mean and
  // save_rstd are the batch statistics and, when running stats are given,
  // new_running_mean/var are (1 - momentum) * running + momentum * batch (with
  // the unbiased batch variance), in the running stats' dtype; else shape [0].
  // eval: normalizes with the running stats, returned as save_mean and
  // save_rstd = 1 / sqrt(running_var + eps); new_running_* have shape [0].
  m.def(
      "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, bool training, float momentum, float eps) -> (Tensor output, "
      "Tensor save_mean, Tensor save_rstd, Tensor new_running_mean, Tensor new_running_var)",
      tags);
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor save_mean, Tensor save_rstd, bool training, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
      tags);
  // Fused residual add (pre-norm transformer blocks): the row is
  // sum = input + residual (input's shape and dtype), returned as well as its
  // norm, computed in one pass. Backward: layer_norm_backward /
  // rms_norm_backward on sum, whose gradient then goes to both addends.
  m.def(
      "fused_add_layer_norm_forward(Tensor input, Tensor residual, SymInt[] normalized_shape, "
      "Tensor? weight, Tensor? bias, float eps) -> (Tensor output, Tensor sum, Tensor mean, "
      "Tensor rstd)",
      tags);
  m.def(
      "fused_add_rms_norm_forward(Tensor input, Tensor residual, SymInt[] normalized_shape, "
      "Tensor? weight, float eps) -> (Tensor output, Tensor sum, Tensor rstd)",
      tags);
}
