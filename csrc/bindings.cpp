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
  m.def("cuda_enabled() -> bool", &sgs::cuda_enabled);
}

TORCH_LIBRARY_IMPL(sgs, CPU, m) {
  m.impl("surgery", &sgs::surgery_cpu);
  m.impl("surgery_parts", &sgs::surgery_parts_cpu);
  m.impl("surgery_stats", &sgs::surgery_stats_cpu);
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
