// Entry points of selftest_kernels.cpp, bound in emulated_ops.cpp's module.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

std::vector<at::Tensor> neighbour_exchange(bool barrier, int64_t blocks, int64_t threads);
std::string launch_faulty(const std::string& name, int64_t threads);
std::string launch_with(int64_t block_x, int64_t block_y, int64_t grid_y, int64_t shared_bytes, int64_t allow_shared);
at::Tensor read_shared_past_size(int64_t floats);
at::Tensor read_global_past_end(const at::Tensor& input);
std::vector<at::Tensor> warp_intrinsics(int64_t delta, int64_t width);
