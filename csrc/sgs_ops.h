// Declarations shared by the op registration (bindings.cpp) and the device kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace sgs {

// Returns {update} or, with parts, {update, mean, shared, diversity, stats[4] (float64)}.
std::vector<at::Tensor> surgery_cpu_impl(const at::Tensor& grads, const at::Tensor& assign, double tau,
                                         double rho, double alpha, double beta, bool soft, bool parts);
#ifdef SGS_WITH_CUDA
std::vector<at::Tensor> surgery_cuda_impl(const at::Tensor& grads, const at::Tensor& assign, double tau,
                                          double rho, double alpha, double beta, bool soft, bool parts);
#endif

}  // namespace sgs
