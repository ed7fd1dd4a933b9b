// Declarations shared by the op registration (bindings.cpp) and the device kernels.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace sgs {

// The op's outputs, allocated the same way by every device kernel: update [N, C, H, W] and,
// with parts, mean/shared/diversity of the same shape and stats [4] (float64, zeroed).
struct SurgeryOutputs {
  at::Tensor update, mean, shared, diversity, stats;
  bool parts;

  SurgeryOutputs(const at::Tensor& grads, bool with_parts) : parts(with_parts) {
    const auto shape = grads.sizes().slice(1);
    update = at::empty(shape, grads.options());
    if (parts) {
      mean = at::empty(shape, grads.options());
      shared = at::empty(shape, grads.options());
      diversity = at::empty(shape, grads.options());
      stats = at::zeros({4}, grads.options().dtype(at::kDouble));
    }
  }

  // An empty input has nothing to compute: the parts of no image are zero-sized anyway.
  std::vector<at::Tensor> list() const {
    if (parts) return {update, mean, shared, diversity, stats};
    return {update};
  }
};

// Returns {update} or, with parts, {update, mean, shared, diversity, stats[4] (float64)}.
std::vector<at::Tensor> surgery_cpu_impl(const at::Tensor& grads, const at::Tensor& assign, double tau,
                                         double rho, double alpha, double beta, bool soft, bool parts);
#ifdef SGS_WITH_CUDA
std::vector<at::Tensor> surgery_cuda_impl(const at::Tensor& grads, const at::Tensor& assign, double tau,
                                          double rho, double alpha, double beta, bool soft, bool parts);
#endif

}  // namespace sgs
