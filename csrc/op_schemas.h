// The schema of every layernorm_ext op, written once: ops.cpp defines them in
// the layernorm_ext namespace; the tests' CPU executor of the CUDA kernels
// defines the same schemas in its own namespace for the same glue.
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
#pragma once

#include <torch/library.h>

#include <vector>

namespace layernorm_ext {

// Every schema, in definition order.
inline constexpr const char* kOpSchemas[] = {
    "layer_norm_forward(Tensor input, SymInt[] normalized_shape, Tensor? weight, "
    "Tensor? bias, float eps) -> (Tensor output, Tensor mean, Tensor rstd)",
    "layer_norm_backward(Tensor grad_output, Tensor input, SymInt[] normalized_shape, "
    "Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, bool[3] output_mask) "
    "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
    "rms_norm_forward(Tensor input, SymInt[] normalized_shape, Tensor? weight, "
    "float eps) -> (Tensor output, Tensor rstd)",
    "rms_norm_backward(Tensor grad_output, Tensor input, SymInt[] normalized_shape, "
    "Tensor rstd, Tensor? weight, bool[2] output_mask) "
    "-> (Tensor grad_input, Tensor grad_weight)",
    // training: normalizes with the batch's biased variance; save_mean and
    // save_rstd are the batch statistics and, when running stats are given,
    // new_running_mean/var are (1 - momentum) * running + momentum * batch (with
    // the unbiased batch variance), in the running stats' dtype; else shape [0].
    // eval: normalizes with the running stats, returned as save_mean and
    // save_rstd = 1 / sqrt(running_var + eps); new_running_* have shape [0].
    "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
    "Tensor? running_var, bool training, float momentum, float eps) -> (Tensor output, "
    "Tensor save_mean, Tensor save_rstd, Tensor new_running_mean, Tensor new_running_var)",
    "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, "
    "Tensor save_mean, Tensor save_rstd, bool training, bool[3] output_mask) "
    "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
    // Fused residual add (pre-norm transformer blocks): the row is
    // sum = input + residual (input's shape and dtype), returned as well as its
    // norm, computed in one pass. Backward: layer_norm_backward /
    // rms_norm_backward on sum, whose gradient then goes to both addends.
    "fused_add_layer_norm_forward(Tensor input, Tensor residual, SymInt[] normalized_shape, "
    "Tensor? weight, Tensor? bias, float eps) -> (Tensor output, Tensor sum, Tensor mean, "
    "Tensor rstd)",
    "fused_add_rms_norm_forward(Tensor input, Tensor residual, SymInt[] normalized_shape, "
    "Tensor? weight, float eps) -> (Tensor output, Tensor sum, Tensor rstd)",
};

inline void define_ops(torch::Library& m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  for (const char* schema : kOpSchemas) m.def(schema, tags);
}

} // namespace layernorm_ext
