// Declarations shared by the op registration (bindings.cpp) and the device kernels.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace sgs {

// What a call computes: the update only (sgs::surgery), the update and the four diagnostic sums
// (sgs::surgery_stats: what a DM loop logs every step), or everything (sgs::surgery_parts).
enum class Outputs { kUpdate, kStats, kParts };

// The op's outputs, allocated the same way by every device kernel: update [N, C, H, W]; with
// stats, stats [4] (float64, zeroed: kernels add to it); with parts also mean/shared/diversity.
struct SurgeryOutputs {
  at::Tensor update, mean, shared, diversity, stats;
  Outputs what;

  SurgeryOutputs(const at::Tensor& grads, Outputs w) : what(w) {
    const auto shape = grads.sizes().slice(1);
    update = at::empty(shape, grads.options());
    if (what != Outputs::kUpdate) stats = at::zeros({4}, grads.options().dtype(at::kDouble));
    if (what == Outputs::kParts) {
      mean = at::empty(shape, grads.options());
      shared = at::empty(shape, grads.options());
      diversity = at::empty(shape, grads.options());
    }
  }
  bool parts() const { return what == Outputs::kParts; }
  bool with_stats() const { return what != Outputs::kUpdate; }

  // {update}, {update, stats} or {update, mean, shared, diversity, stats}. An empty input has
  // nothing to compute: the parts of no image are zero-sized anyway, the sums zero.
  std::vector<at::Tensor> list() const {
    if (what == Outputs::kParts) return {update, mean, shared, diversity, stats};
    if (what == Outputs::kStats) return {update, stats};
    return {update};
  }
};

// The sums in stats[4] (float64), over every (image, channel) plane's half spectrum [H][W/2+1]:
// the hard or soft mask summed over the real and imaginary components, the number of those
// components (2 per bin), sum |Sh|^2 and sum |Fbar|^2 (sgs_reference's stats).
std::vector<at::Tensor> surgery_cpu_impl(const at::Tensor& grads, const at::Tensor& assign, double tau,
                                         double rho, double alpha, double beta, bool soft, Outputs what);
// sgs::surgery_general (CPU): the general formulations of reference.sgs_reference (combine="mask").
// The mask reads the spectra of agree_on [D, N, C, H, W] (none: of grads), each domain plane's
// magnitudes divided by the square root of its half-spectrum energy with equalize;
// update = irfft2(mean_weight * Fbar + alpha * Sh + beta * V + decay * (1 - M) * rfft2(images)),
// images [N, C, H, W] read only when decay != 0. Returns {update, mean, shared, diversity, stats}
// as surgery_cpu_impl with Outputs::kParts. Inputs validated by the caller (same dtype and shapes).
std::vector<at::Tensor> surgery_general_cpu_impl(const at::Tensor& grads, const at::Tensor& assign,
                                                 const c10::optional<at::Tensor>& agree_on,
                                                 const c10::optional<at::Tensor>& images, double tau, double rho,
                                                 double alpha, double beta, double mean_weight, double decay,
                                                 bool soft, bool equalize);
#ifdef SGS_WITH_CUDA
std::vector<at::Tensor> surgery_cuda_impl(const at::Tensor& grads, const at::Tensor& assign, double tau,
                                          double rho, double alpha, double beta, bool soft, Outputs what);
#endif

}  // namespace sgs
