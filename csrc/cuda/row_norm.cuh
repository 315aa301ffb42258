// Launchers of the LayerNorm (kCenter = true) and RMSNorm (kCenter = false)
// CUDA kernels. Plain pointers and sizes, no torch types, so that the .cu
// files compile with nvcc alone; the torch glue lives in
// layer_norm_cuda.cpp and rms_norm_cuda.cpp.
//
// The input is a matrix of `rows` x `cols` contiguous elements; every row is
// normalized on its own (see csrc/cpu/row_norm_kernels.h for the math, which
// the CUDA kernels reproduce: two-pass variance, fp32 accumulation, fp64 for
// double). T is float, double, __half or __nv_bfloat16; W (weight and bias)
// is T, or float for a __half/__nv_bfloat16 T. Every launcher runs on
// `stream` of the current device and returns the launch's error code.
#pragma once

#include "acc_type.h"

namespace layernorm_ext::cuda {

// weight and bias may be null (no affine; RMSNorm passes a null bias); mean is
// unused (may be null) when !kCenter. residual and sum_out are both null (the
// plain ops) or both set (the fused residual-add ops): then the rows normalized
// are sum = input + residual, rounded to T as torch's add rounds it, and the
// sum is stored to sum_out (rows x cols, contiguous).
template <bool kCenter, typename T, typename W>
cudaError_t row_norm_forward_cuda(
    const T* input,
    const T* residual,
    T* sum_out,
    const W* weight,
    const W* bias,
    T* output,
    acc_t<T>* mean,
    acc_t<T>* rstd,
    int64_t rows,
    int64_t cols,
    double eps,
    cudaStream_t stream);

// Number of acc_t<T> elements of the workspace that row_norm_backward_cuda
// needs for the weight/bias gradient partials (0 when neither is asked for).
int64_t row_norm_backward_workspace_size(int64_t rows, int64_t cols, bool grad_weight, bool grad_bias);

// grad_input, grad_weight and grad_bias may each be null (not asked for);
// weight may be null (no affine); mean is unused when !kCenter. `workspace`
// holds row_norm_backward_workspace_size(...) accumulators.
template <bool kCenter, typename T, typename W>
cudaError_t row_norm_backward_cuda(
    const T* grad_output,
    const T* input,
    const acc_t<T>* mean,
    const acc_t<T>* rstd,
    const W* weight,
    T* grad_input,
    W* grad_weight,
    W* grad_bias,
    acc_t<T>* workspace,
    int64_t rows,
    int64_t cols,
    cudaStream_t stream);

} // namespace layernorm_ext::cuda
