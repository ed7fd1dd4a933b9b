// Registration of the sgs::surgery ops (schema, checks, CPU and CUDA implementations).
// The Python side (sgs_cuda/ops.py) registers the fake kernels used by torch.compile.
#include <torch/library.h>
#include <torch/types.h>

#include "sgs_ops.h"

namespace sgs {
namespace {

// The Python wrapper validates with friendlier messages; these checks protect direct callers
// of torch.ops.sgs.* from reaching a kernel with inputs it cannot handle.
bool check_and_parse(const at::Tensor& grads, const at::Tensor& assign, double tau, double rho,
                     c10::string_view mask) {
  TORCH_CHECK(grads.dim() == 5, "sgs::surgery: grads must be [D, N, C, H, W], got ", grads.dim(), " dims");
  TORCH_CHECK(at::isFloatingType(grads.scalar_type()), "sgs::surgery: grads must be floating point, got ",
              grads.scalar_type());
  TORCH_CHECK(grads.size(0) > 0, "sgs::surgery: grads has D = 0 domains");
  TORCH_CHECK(assign.dim() == 1 && assign.size(0) == grads.size(1), "sgs::surgery: assign must have shape [N] = [",
              grads.size(1), "], got ", assign.sizes());
  TORCH_CHECK(!at::isFloatingType(assign.scalar_type()) && !at::isComplexType(assign.scalar_type()),
              "sgs::surgery: assign must be an integer tensor, got ", assign.scalar_type());
  TORCH_CHECK(assign.device() == grads.device(), "sgs::surgery: assign is on ", assign.device(),
              " but grads is on ", grads.device());
  TORCH_CHECK(tau >= 0 && tau <= 1, "sgs::surgery: tau must lie in [0, 1], got ", tau);
  TORCH_CHECK(rho >= 0 && rho <= 1, "sgs::surgery: rho must lie in [0, 1], got ", rho);
  TORCH_CHECK(mask == "hard" || mask == "soft", "sgs::surgery: mask must be 'hard' or 'soft', got '", mask, "'");
  // Out-of-range domains: the same error as the CUDA paths' (surgery_cuda_impl checks there).
  if (assign.device().is_cpu() && assign.numel() > 0) {
    const int64_t lo = assign.min().item<int64_t>(), hi = assign.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < grads.size(0), "sgs::surgery: assign values must lie in [0, D) = [0, ",
                      grads.size(0), "), got range [", lo, ", ", hi, "]");
  }
  return mask == "soft";
}

at::Tensor surgery_cpu(const at::Tensor& grads, const at::Tensor& assign, double tau, double rho, double alpha,
                       double beta, c10::string_view mask) {
  const bool soft = check_and_parse(grads, assign, tau, rho, mask);
  return surgery_cpu_impl(grads, assign, tau, rho, alpha, beta, soft, Outputs::kUpdate)[0];
}

std::tuple<at::Tensor, at::Tensor> surgery_stats_cpu(const at::Tensor& grads, const at::Tensor& assign, double tau,
                                                     double rho, double alpha, double beta, c10::string_view mask) {
  const bool soft = check_and_parse(grads, assign, tau, rho, mask);
  auto r = surgery_cpu_impl(grads, assign, tau, rho, alpha, beta, soft, Outputs::kStats);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> surgery_parts_cpu(
    const at::Tensor& grads, const at::Tensor& assign, double tau, double rho, double alpha, double beta,
    c10::string_view mask) {
  const bool soft = check_and_parse(grads, assign, tau, rho, mask);
  auto r = surgery_cpu_impl(grads, assign, tau, rho, alpha, beta, soft, Outputs::kParts);
  return {r[0], r[1], r[2], r[3], r[4]};
}

// The checks of sgs::surgery_general beyond check_and_parse's: the optional tensors match grads.
void check_general_input(const at::Tensor& grads, const c10::optional<at::Tensor>& t, const char* name,
                         at::IntArrayRef shape, const char* layout) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->sizes() == shape, "sgs::surgery_general: ", name, " must have the shape ", layout, " = ", shape,
              ", got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == grads.scalar_type(), "sgs::surgery_general: ", name, " must have grads' dtype ",
              grads.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK(t->device() == grads.device(), "sgs::surgery_general: ", name, " is on ", t->device(),
              " but grads is on ", grads.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> surgery_general_cpu(
    const at::Tensor& grads, const at::Tensor& assign, const c10::optional<at::Tensor>& agree_on,
    const c10::optional<at::Tensor>& images, double tau, double rho, double alpha, double beta, double mean_weight,
    double decay, c10::string_view mask, bool equalize) {
  const bool soft = check_and_parse(grads, assign, tau, rho, mask);
  check_general_input(grads, agree_on, "agree_on", grads.sizes(), "grads.shape [D, N, C, H, W]");
  check_general_input(grads, images, "images", grads.sizes().slice(1), "grads.shape[1:] [N, C, H, W]");
  TORCH_CHECK(decay == 0 || images.has_value(), "sgs::surgery_general: decay = ", decay,
              " needs images [N, C, H, W], got None");
  auto r = surgery_general_cpu_impl(grads, assign, agree_on, images, tau, rho, alpha, beta, mean_weight, decay, soft,
                                    equalize);
  return {r[0], r[1], r[2], r[3], r[4]};
}

#ifdef SGS_WITH_CUDA
at::Tensor surgery_cuda(const at::Tensor& grads, const at::Tensor& assign, double tau, double rho, double alpha,
                        double beta, c10::string_view mask) {
  const bool soft = check_and_parse(grads, assign, tau, rho, mask);
  return surgery_cuda_impl(grads, assign, tau, rho, alpha, beta, soft, Outputs::kUpdate)[0];
}

std::tuple<at::Tensor, at::Tensor> surgery_stats_cuda(const at::Tensor& grads, const at::Tensor& assign, double tau,
                                                      double rho, double alpha, double beta, c10::string_view mask) {
  const bool soft = check_and_parse(grads, assign, tau, rho, mask);
  auto r = surgery_cuda_impl(grads, assign, tau, rho, alpha, beta, soft, Outputs::kStats);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> surgery_parts_cuda(
    const at::Tensor& grads, const at::Tensor& assign, double tau, double rho, double alpha, double beta,
    c10::string_view mask) {
  const bool soft = check_and_parse(grads, assign, tau, rho, mask);
  auto r = surgery_cuda_impl(grads, assign, tau, rho, alpha, beta, soft, Outputs::kParts);
  return {r[0], r[1], r[2], r[3], r[4]};
}
#endif

bool cuda_enabled() {
#ifdef SGS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace sgs

TORCH_LIBRARY(sgs, m) {
  m.def("surgery(Tensor grads, Tensor assign, float tau, float rho, float alpha, float beta, str mask) -> Tensor");
  m.def("surgery_parts(Tensor grads, Tensor assign, float tau, float rho, float alpha, float beta, str mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The update and stats[4] of surgery_parts (float64 sums: kept components, components, |Sh|^2,
  // |Fbar|^2), without the parts: what a DM loop needs every step, on every path's fastest kernel.
  m.def("surgery_stats(Tensor grads, Tensor assign, float tau, float rho, float alpha, float beta, str mask) "
        "-> (Tensor, Tensor)");
  // The general formulations of reference.sgs_reference (combine="mask"), CPU only: the mask read
  // from agree_on's spectra (None: grads'), equalize, mean_weight and the removal decay * (1 - M) *
  // images; the outputs of surgery_parts.
  m.def("surgery_general(Tensor grads, Tensor assign, Tensor? agree_on, Tensor? images, float tau, float rho, "
        "float alpha, float beta, float mean_weight, float decay, str mask, bool equalize) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_enabled() -> bool", &sgs::cuda_enabled);
}

TORCH_LIBRARY_IMPL(sgs, CPU, m) {
  m.impl("surgery", &sgs::surgery_cpu);
  m.impl("surgery_parts", &sgs::surgery_parts_cpu);
  m.impl("surgery_stats", &sgs::surgery_stats_cpu);
  m.impl("surgery_general", &sgs::surgery_general_cpu);
}

#ifdef SGS_WITH_CUDA
TORCH_LIBRARY_IMPL(sgs, CUDA, m) {
  m.impl("surgery", &sgs::surgery_cuda);
  m.impl("surgery_parts", &sgs::surgery_parts_cuda);
  m.impl("surgery_stats", &sgs::surgery_stats_cuda);
}
#endif

#ifdef SGS_PYTHON_MODULE
// Ahead-of-time builds (setup.py) are imported as the module sgs_cuda._C; importing it runs
// the static registrations above.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
#endif
