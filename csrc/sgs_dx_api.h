// What sgs_cuda.cu needs to know of the cuFFTDx kernel (csrc/sgs_cuda_dx*.cu). No cuFFTDx and
// no torch here, so the portable CUDA source compiles whether or not nvidia-mathdx is installed.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <string>

#include "sgs_math.h"

// The instantiated plane sizes (H, W); each one also needs sgs::dx::Config<H, W> in sgs_dx.h
// and an explicit instantiation in one of the sgs_cuda_dx_<n>.cu files (compiled in parallel).
#define SGS_DX_SIZES(X) \
  X(28, 28) X(32, 32) X(64, 64) X(32, 64) X(64, 32) X(128, 128) X(64, 128) X(128, 64)

namespace sgs {
namespace dx {

enum class InType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

struct Call {
  const void* grads;      // [D, planes, H, W], 16-byte aligned
  InType in_type;
  const int64_t* assign;  // [N]
  void* update;           // [planes, H, W]
  double* stats;          // [4], zeroed: the diagnostic sums are added to it; null: update only
  int64_t planes, channels;
  int domains;
  SurgeryParams<float> p;
  cudaStream_t stream;
  int device;
};

// Per size, defined in sgs_cuda_dx.cuh and instantiated in an sgs_cuda_dx_<n>.cu file: the launch;
// {threads, shared-memory bytes, CTAs per plane} per CTA (float32 input); the binary version of the
// loaded code (90: sm_90); how many CTAs of the kernel can be resident on `device` at once (0: it
// cannot be launched there; queried once per device and input type).
template <int H, int W>
void run_size(const Call& c);
template <int H, int W>
std::array<int64_t, 3> resources();
template <int H, int W>
int binary_version();
template <int H, int W>
int64_t resident_ctas(InType t, int device);

// Whether the dx kernel is instantiated for H x W and can run with this input type on `device`.
bool applies(int H, int W, InType t, int device);
// Launches it (applies() must be true).
void run(int H, int W, const Call& c);
// One line: the instantiated sizes with their threads, shared memory and cluster size per CTA.
std::string describe();

}  // namespace dx
}  // namespace sgs
