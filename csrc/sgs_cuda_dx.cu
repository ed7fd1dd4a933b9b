// Dispatch of the cuFFTDx kernel: which sizes are instantiated, whether the device can run them,
// and the launch. The kernels themselves are instantiated in sgs_cuda_dx_<n>.cu (one file per
// few sizes, so that a parallel build compiles them side by side).
#include <array>
#include <mutex>
#include <string>

#include "sgs_dx_api.h"

namespace sgs {
namespace dx {

namespace {

bool instantiated(int H, int W) {
#define SGS_DX_MATCH(h, w) \
  if (H == h && W == w) return true;
  SGS_DX_SIZES(SGS_DX_MATCH)
#undef SGS_DX_MATCH
  return false;
}

// Compute capability 9.0 and sm_90 code in this build (the kernels trap elsewhere), per device:
// the code's version is queried on `device` itself (made current for the query), so the answer
// for one device never depends on which device happened to be current. A failed query is not
// cached (it may be transient).
bool device_runs_sm90(int device) {
  static std::mutex mu;
  static std::array<int, 64> cache{};  // 0 unknown, 1 yes, 2 no
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0 || device >= 64) return false;
  if (cache[device] != 0) return cache[device] == 1;
  int major = 0, minor = 0, current = -1;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess ||
      cudaGetDevice(&current) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  bool ok = major == 9 && minor == 0;
  if (ok && current != device) ok = cudaSetDevice(device) == cudaSuccess;
  if (ok) ok = binary_version<32, 32>() == 90;
  if (current != device) (void)cudaSetDevice(current);
  cache[device] = ok ? 1 : 2;
  return ok;
}

int64_t resident_for(int H, int W, InType t, int device) {
#define SGS_DX_RESIDENT(h, w) \
  if (H == h && W == w) return resident_ctas<h, w>(t, device);
  SGS_DX_SIZES(SGS_DX_RESIDENT)
#undef SGS_DX_RESIDENT
  return 0;
}

}  // namespace

bool applies(int H, int W, InType t, int device) {
  return instantiated(H, W) && device_runs_sm90(device) && resident_for(H, W, t, device) > 0;
}

void run(int H, int W, const Call& c) {
#define SGS_DX_RUN(h, w) \
  if (H == h && W == w) return run_size<h, w>(c);
  SGS_DX_SIZES(SGS_DX_RUN)
#undef SGS_DX_RUN
}

std::string describe() {
  std::string s;
#define SGS_DX_DESCRIBE(h, w)                                                                      \
  {                                                                                                \
    const auto r = resources<h, w>();                                                              \
    s += (s.empty() ? "" : ", ") + std::to_string(h) + "x" + std::to_string(w) + " (" +            \
         std::to_string(r[0]) + " threads" + (r[2] > 1 ? " x " + std::to_string(r[2]) + " CTAs" : "") + \
         ", " + std::to_string((r[1] + 1023) / 1024) + " KB smem)";                                 \
  }
  SGS_DX_SIZES(SGS_DX_DESCRIBE)
#undef SGS_DX_DESCRIBE
  return s;
}

}  // namespace dx
}  // namespace sgs
