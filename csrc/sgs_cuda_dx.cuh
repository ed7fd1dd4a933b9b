// Device side of the cuFFTDx kernel: the FFT descriptors, the device context that runs the block
// algorithm of sgs_dx.h with them, the kernel and its launch. Included by the sgs_cuda_dx_<n>.cu
// files, each of which instantiates a few sizes, so that ninja compiles them in parallel.
//
// Compiled for sm_90 (H100/H200) only: cuFFTDx's implementations are chosen per architecture, and
// the project's GPUs are Hopper. Code for another architecture traps, and dx::applies() never
// sends a launch there (the portable kernel takes over).
#pragma once

// torch's extension flags hide the half-precision operators (-D__CUDA_NO_HALF_OPERATORS__ and
// friends, against clashes with at::Half); cuFFTDx's complex types need them, and these files do
// no at::Half arithmetic. Must come before the first include of cuda_fp16.h.
#undef __CUDA_NO_HALF_OPERATORS__
#undef __CUDA_NO_HALF_CONVERSIONS__
#undef __CUDA_NO_HALF2_OPERATORS__
#undef __CUDA_NO_BFLOAT16_CONVERSIONS__

#ifndef CUFFTDX_DISABLE_CUTLASS_DEPENDENCY
#define CUFFTDX_DISABLE_CUTLASS_DEPENDENCY  // cuFFTDx alone; CUTLASS is not needed
#endif
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>

#include <array>
#include <cufftdx.hpp>
#include <mutex>
#include <type_traits>

#include "sgs_dx.h"
#include "sgs_dx_api.h"

namespace sgs {
namespace dx {

template <>
struct Io<__half> {
  static __device__ __forceinline__ Cplx load2(const __half* p) {
    const float2 v = __half22float2(*reinterpret_cast<const __half2*>(p));
    return Cplx{v.x, v.y};
  }
  static __device__ __forceinline__ void store2(__half* p, float a, float b) {
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
  }
};

template <>
struct Io<__nv_bfloat16> {
  static __device__ __forceinline__ Cplx load2(const __nv_bfloat16* p) {
    const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
    return Cplx{v.x, v.y};
  }
  static __device__ __forceinline__ void store2(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
  }
};

constexpr unsigned kArch = 900;

// The four block FFTs of a shape. The checks state what sgs_dx.h assumes of cuFFTDx: block
// dimensions (X, F) shared by all four, E elements per thread in registers, no global workspace.
template <class S>
struct Ffts {
  template <int N, int E, cufftdx::fft_direction Dir>
  using Desc = decltype(cufftdx::Size<N>() + cufftdx::Precision<float>() + cufftdx::Type<cufftdx::fft_type::c2c>() +
                        cufftdx::Direction<Dir>() + cufftdx::ElementsPerThread<E>() +
                        cufftdx::FFTsPerBlock<S::F>() + cufftdx::SM<kArch>() + cufftdx::Block());
  using RowFwd = Desc<S::M, S::Er, cufftdx::fft_direction::forward>;
  using RowInv = Desc<S::M, S::Er, cufftdx::fft_direction::inverse>;
  using ColFwd = Desc<S::H, S::Ec, cufftdx::fft_direction::forward>;
  using ColInv = Desc<S::H, S::Ec, cufftdx::fft_direction::inverse>;

  template <class FFT, int E>
  static constexpr bool fits() {
    return FFT::block_dim.x == S::X && FFT::block_dim.y == S::F && FFT::block_dim.z == 1 &&
           FFT::elements_per_thread == E && FFT::storage_size == E && FFT::stride == S::X &&
           !FFT::requires_workspace && sizeof(typename FFT::value_type) == sizeof(Cplx);
  }
  static_assert(fits<RowFwd, S::Er>() && fits<RowInv, S::Er>(), "row FFT layout differs from sgs_dx.h's");
  static_assert(fits<ColFwd, S::Ec>() && fits<ColInv, S::Ec>(), "column FFT layout differs from sgs_dx.h's");

  static constexpr unsigned workspace = std::max(std::max(RowFwd::shared_memory_size, RowInv::shared_memory_size),
                                                 std::max(ColFwd::shared_memory_size, ColInv::shared_memory_size));
  template <class Tag>
  using For = std::conditional_t<
      std::is_same_v<Tag, RowFwd>, RowFwd,
      std::conditional_t<std::is_same_v<Tag, sgs::dx::RowInv>, RowInv,
                         std::conditional_t<std::is_same_v<Tag, sgs::dx::ColFwd>, ColFwd, ColInv>>>;
};

template <class S>
struct DeviceCtx {
  ThreadState<S> t;   // this thread's registers
  unsigned char* ws;  // cuFFTDx's shared-memory workspace

  __device__ __forceinline__ void sync() { __syncthreads(); }
  template <class Fn>
  __device__ __forceinline__ void each(Fn&& f) {
    f(t);
  }
  template <class Tag, class Get>
  __device__ __forceinline__ void fft(Tag, Get&& get) {
    using FFT = typename Ffts<S>::template For<Tag>;
    __syncthreads();  // every thread is past the previous FFT's use of the workspace
    FFT().execute(get(t), ws);
  }
  // The block copies `bytes` (a multiple of 16) in 16-byte cp.async chunks, consecutive threads
  // taking consecutive chunks.
  __device__ __forceinline__ void stage_copy(void* dst, const void* src, int64_t bytes) {
    const int tid = threadIdx.y * S::X + threadIdx.x;
    for (int64_t c = tid; c < bytes / 16; c += S::threads)
      __pipeline_memcpy_async(static_cast<char*>(dst) + 16 * c, static_cast<const char*>(src) + 16 * c, 16);
  }
  __device__ __forceinline__ void stage_commit() { __pipeline_commit(); }
  __device__ __forceinline__ void stage_wait(int pending) {
    if (pending == 0)
      __pipeline_wait_prior(0);
    else
      __pipeline_wait_prior(1);
  }
};

template <class S, typename In>
__global__ void __launch_bounds__(S::threads) dx_kernel(const __grid_constant__ Args<In> a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ != 900
  __trap();
#else
  extern __shared__ __align__(16) unsigned char dx_smem[];
  const Layout L = layout<S>(sizeof(In), Ffts<S>::workspace);
  DeviceCtx<S> ctx;
  ctx.t.x = static_cast<int>(threadIdx.x);
  ctx.t.y = static_cast<int>(threadIdx.y);
  ctx.ws = dx_smem + L.workspace;
  plane_group<S, In>(ctx, a, dx_smem, L, static_cast<int64_t>(blockIdx.x));
#endif
}

template <class S, typename In>
void launch(const Call& c) {
  const Layout L = layout<S>(sizeof(In), Ffts<S>::workspace);
  auto* kernel = dx_kernel<S, In>;
  {  // raise the dynamic shared-memory limit once per device (not during a CUDA graph capture)
    static std::mutex mu;
    static std::array<bool, 64> done{};
    std::lock_guard<std::mutex> lock(mu);
    if (c.device < 0 || c.device >= 64 || !done[c.device]) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(L.total)));
      if (c.device >= 0 && c.device < 64) done[c.device] = true;
    }
  }
  Args<In> a{static_cast<const In*>(c.grads), c.assign, static_cast<In*>(c.update), c.planes, c.channels, c.domains, c.p};
  const int64_t groups = (c.planes + S::P - 1) / S::P;
  kernel<<<dim3(static_cast<unsigned>(groups)), dim3(S::X, S::F), static_cast<size_t>(L.total), c.stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int H, int W>
void run_size(const Call& c) {
  using S = typename Config<H, W>::S;
  switch (c.in_type) {
    case InType::kFloat: return launch<S, float>(c);
    case InType::kHalf: return launch<S, __half>(c);
    case InType::kBFloat16: return launch<S, __nv_bfloat16>(c);
  }
}

template <int H, int W>
std::array<int64_t, 2> resources() {  // float32 input
  using S = typename Config<H, W>::S;
  return {S::threads, layout<S>(sizeof(float), Ffts<S>::workspace).total};
}

template <int H, int W>
int binary_version() {
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(dx_kernel<typename Config<H, W>::S, float>)) !=
      cudaSuccess) {
    (void)cudaGetLastError();  // a failed query must not surface as a later launch error
    return 0;
  }
  return attr.binaryVersion;
}

#define SGS_DX_INSTANTIATE(h, w)                               \
  template void run_size<h, w>(const Call&);                   \
  template std::array<int64_t, 2> resources<h, w>();           \
  template int binary_version<h, w>();

}  // namespace dx
}  // namespace sgs
