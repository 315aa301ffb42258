// Launchers of the BatchNorm CUDA kernels. Plain pointers and sizes, no torch
// types, so that batch_norm.cu compiles with nvcc alone; the torch glue lives
// in batch_norm_cuda.cpp.
//
// The input is N x C x inner (inner = product of the spatial dims), stored
// either NCHW (channel-major inside a sample) or channels-last (C contiguous:
// an (N * inner) x C matrix). T is float, double, __half or __nv_bfloat16.
// Weight, bias and running statistics come (and go) in acc_t<T>: the glue
// converts those [C] vectors, which keeps one kernel per input type. Any of
// weight, bias, running_mean/var may be null (absent). Every launcher runs on
// `stream` of the current device and returns the launch's error code.
#pragma once

#include "acc_type.h"

namespace layernorm_ext::cuda {

struct BatchNormLayout {
  int64_t batch;
  int64_t channels;
  int64_t inner;
  bool channels_last;
};

// Bytes of device workspace every launcher below needs.
template <typename T>
int64_t batch_norm_workspace_bytes(const BatchNormLayout& layout);

// Training: normalizes with the batch's mean and biased variance, returned as
// save_mean and save_rstd = 1 / sqrt(var + eps); when running stats are given,
// writes new_running_mean = momentum * mean + (1 - momentum) * running_mean
// and likewise new_running_var with the unbiased batch variance.
template <typename T>
cudaError_t batch_norm_forward_training_cuda(
    const T* input,
    const acc_t<T>* weight,
    const acc_t<T>* bias,
    const acc_t<T>* running_mean,
    const acc_t<T>* running_var,
    T* output,
    acc_t<T>* save_mean,
    acc_t<T>* save_rstd,
    acc_t<T>* new_running_mean,
    acc_t<T>* new_running_var,
    double momentum,
    double eps,
    const BatchNormLayout& layout,
    void* workspace,
    cudaStream_t stream);

// Eval: normalizes with the running statistics (both required), returned as
// save_mean and save_rstd.
template <typename T>
cudaError_t batch_norm_forward_eval_cuda(
    const T* input,
    const acc_t<T>* weight,
    const acc_t<T>* bias,
    const acc_t<T>* running_mean,
    const acc_t<T>* running_var,
    T* output,
    acc_t<T>* save_mean,
    acc_t<T>* save_rstd,
    double eps,
    const BatchNormLayout& layout,
    void* workspace,
    cudaStream_t stream);

// grad_weight = sum(dy * xhat), grad_bias = sum(dy) per channel, and
// grad_input: training, dx = w * rstd * (dy - mean(dy) - xhat * mean(dy * xhat));
// eval, dx = w * rstd * dy. Null outputs are not computed.
template <typename T>
cudaError_t batch_norm_backward_cuda(
    const T* grad_output,
    const T* input,
    const acc_t<T>* weight,
    const acc_t<T>* save_mean,
    const acc_t<T>* save_rstd,
    bool training,
    T* grad_input,
    acc_t<T>* grad_weight,
    acc_t<T>* grad_bias,
    const BatchNormLayout& layout,
    void* workspace,
    cudaStream_t stream);

} // namespace layernorm_ext::cuda
