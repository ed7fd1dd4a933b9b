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
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>
#include <cooperative_groups.h>

#include <algorithm>
#include <array>
#include <cstdlib>
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

namespace cg = cooperative_groups;

// The four block FFTs of a shape. The checks state what sgs_dx.h assumes of cuFFTDx: block
// dimensions (X, F) shared by all four, E elements per thread in registers, element x + i*X in
// thread x (stride X) in and out, no global workspace.
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
           !FFT::requires_workspace && sizeof(typename FFT::value_type) == sizeof(Cplx) &&
           alignof(typename FFT::value_type) == alignof(Cplx);
  }
  static_assert(fits<RowFwd, S::Er>() && fits<RowInv, S::Er>(), "row FFT layout differs from sgs_dx.h's");
  static_assert(fits<ColFwd, S::Ec>() && fits<ColInv, S::Ec>(), "column FFT layout differs from sgs_dx.h's");

  static constexpr unsigned workspace = std::max(std::max(RowFwd::shared_memory_size, RowInv::shared_memory_size),
                                                 std::max(ColFwd::shared_memory_size, ColInv::shared_memory_size));
  template <class Tag>
  using For = std::conditional_t<
      std::is_same_v<Tag, sgs::dx::RowFwd>, RowFwd,
      std::conditional_t<std::is_same_v<Tag, sgs::dx::RowInv>, RowInv,
                         std::conditional_t<std::is_same_v<Tag, sgs::dx::ColFwd>, ColFwd, ColInv>>>;
};

// The thread FFT of the split kind (sgs_dx.h split_fft): length E, all E elements in one
// thread's registers in natural order (stride 1), in and out.
template <int E, bool Inverse>
struct ThreadFftDesc {
  using FFT = decltype(cufftdx::Size<E>() + cufftdx::Precision<float>() + cufftdx::Type<cufftdx::fft_type::c2c>() +
                       cufftdx::Direction < Inverse ? cufftdx::fft_direction::inverse
                                                    : cufftdx::fft_direction::forward > () + cufftdx::Thread());
  static_assert(FFT::elements_per_thread == E && FFT::storage_size == E && FFT::stride == 1 &&
                    sizeof(typename FFT::value_type) == sizeof(Cplx) &&
                    alignof(typename FFT::value_type) == alignof(Cplx),
                "thread FFT layout differs from sgs_dx.h's");
};

template <class Tag>
struct IsThreadFft : std::false_type {};
template <int E, bool Inverse>
struct IsThreadFft<ThreadFft<E, Inverse>> : std::true_type {
  using Desc = ThreadFftDesc<E, Inverse>;
};

template <class S>
constexpr unsigned workspace_bytes() {
  if constexpr (S::kind == Fft::kBlock)
    return Ffts<S>::workspace;
  else
    return 0;
}

template <class S>
struct DeviceCtx {
  ThreadState<S> t;   // this thread's registers
  unsigned char* ws;  // cuFFTDx's shared-memory workspace
  int rank;           // in the cluster

  __device__ __forceinline__ int tid() const { return t.y * S::X + t.x; }
  // The lanes of this thread's warp that exist (the last warp of a CTA may be partial).
  __device__ __forceinline__ unsigned lane_mask() const {
    const int n = S::threads - (tid() & ~31);
    return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
  }

  __device__ __forceinline__ void sync() { __syncthreads(); }
  // Barrier of the cluster, with release/acquire semantics for the distributed shared memory.
  __device__ __forceinline__ void cluster_sync() {
    if constexpr (S::CS > 1)
      cg::this_cluster().sync();
    else
      __syncthreads();
  }
  template <typename T>
  __device__ __forceinline__ T* remote(T* p, int r) {
    if constexpr (S::CS > 1)
      return r == rank ? p : cg::this_cluster().map_shared_rank(p, r);
    else
      return p;
  }
  template <class Fn>
  __device__ __forceinline__ void each(Fn&& f) {
    f(t);
  }
  template <class Tag, class Get>
  __device__ __forceinline__ void fft(Tag, Get&& get) {
    if constexpr (IsThreadFft<Tag>::value) {
      using FFT = typename IsThreadFft<Tag>::Desc::FFT;
      FFT().execute(reinterpret_cast<typename FFT::value_type*>(get(t)));
    } else {
      using FFT = typename Ffts<S>::template For<Tag>;
      __syncthreads();  // every thread is past the previous FFT's use of the workspace
      FFT().execute(reinterpret_cast<typename FFT::value_type*>(get(t)), ws);
    }
  }
  // The split FFT's stage across the threads x and x ^ m of one FFT (the same warp: X <= 32).
  template <int E, class Get, class Pre, class Post>
  __device__ __forceinline__ void exchange(int m, Get&& get, Pre&& pre, Post&& post) {
    Cplx* v = get(t);
    const unsigned mask = lane_mask();
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const Cplx s = pre(t.x, v[i]);
      const Cplx o{__shfl_xor_sync(mask, s.x, m), __shfl_xor_sync(mask, s.y, m)};
      v[i] = post(t.x, s, o);
    }
  }
  // Mirror exchange of column FFT 0 (sgs_dx.h): register i receives the value of element
  // (H - out_index) % H from the thread that holds it (the same FFT id, so the same warp). Warps
  // without a column FFT 0 skip it (warp-uniform).
  template <int E, class Get, class Fn>
  __device__ __forceinline__ void mirror(Get&& get, int r, Fn&& fn) {
    if (!warp_holds_packed<S>(tid() >> 5, r)) return;
    Cplx* v = get(t);
    Cplx other[E];
    const unsigned mask = lane_mask();
    const int lane0 = (tid() - t.x) & 31;  // lane of thread x = 0 of this FFT id
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const Cplx s = mirror_value<S, E>(v, t.x, i);
      const int src = lane0 + mirror_thread<S, E>(t.x, i);
      other[i] = Cplx{__shfl_sync(mask, s.x, src), __shfl_sync(mask, s.y, src)};
    }
#pragma unroll
    for (int i = 0; i < E; ++i) v[i] = fn(t, i, v[i], other[i]);
  }
  // The block copies `bytes` (a multiple of 16) in 16-byte cp.async chunks, consecutive threads
  // taking consecutive chunks.
  __device__ __forceinline__ void stage_copy(void* dst, const void* src, int64_t bytes) {
    for (int64_t c = tid(); c < bytes / 16; c += S::threads)
      __pipeline_memcpy_async(static_cast<char*>(dst) + 16 * c, static_cast<const char*>(src) + 16 * c, 16);
  }
  __device__ __forceinline__ void stage_commit() { __pipeline_commit(); }
  __device__ __forceinline__ void stage_wait(int pending) {
    if (pending == 0)
      __pipeline_wait_prior(0);
    else
      __pipeline_wait_prior(1);
  }
  // Warp sums of t.sums; lane 0 adds them to its warp's slots (no other thread writes those).
  __device__ __forceinline__ void sums_add(double* slots) {
    const unsigned mask = lane_mask();
    const int lane = tid() & 31, n = S::threads - (tid() & ~31);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      double v = static_cast<double>(t.sums[q]);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const double o = __shfl_down_sync(mask, v, off);
        if (lane + off < n) v += o;
      }
      if (lane == 0) slots[(tid() >> 5) * 4 + q] += v;
    }
  }
  // One atomic addition per sum and CTA, when it has done all its planes.
  __device__ __forceinline__ void sums_flush(const double* slots, double* out) {
    __syncthreads();
    if (tid() == 0) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        double s = 0.0;
        for (int w = 0; w < S::warps; ++w) s += slots[w * 4 + q];
        atomicAdd(out + q, s);
      }
    }
  }
};

template <class S, typename In>
__global__ void __launch_bounds__(S::threads, S::min_ctas) dx_kernel(const __grid_constant__ Args<In> a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ != 900
  __trap();
#else
  extern __shared__ __align__(16) unsigned char dx_smem[];
  const Layout L = layout<S>(sizeof(In), workspace_bytes<S>());
  DeviceCtx<S> ctx;
  ctx.t.x = static_cast<int>(threadIdx.x);
  ctx.t.y = static_cast<int>(threadIdx.y);
  ctx.ws = dx_smem + L.workspace;
  ctx.rank = 0;
  if constexpr (S::CS > 1) ctx.rank = static_cast<int>(cg::this_cluster().block_rank());
  // Clusters are consecutive blocks along x: cluster blockIdx.x / CS, rank blockIdx.x % CS.
  run_cta<S, In>(ctx, a, dx_smem, L, static_cast<int64_t>(blockIdx.x / S::CS),
                 static_cast<int64_t>(gridDim.x / S::CS), ctx.rank);
#endif
}

// The launch configuration of `ctas` CTAs in clusters of S::CS; points at `attr`, which must
// outlive it.
template <class S, typename In>
cudaLaunchConfig_t launch_config(unsigned ctas, cudaStream_t stream, cudaLaunchAttribute& attr) {
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = static_cast<unsigned>(S::CS);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(ctas);
  cfg.blockDim = dim3(S::X, S::F);
  cfg.dynamicSmemBytes = static_cast<size_t>(layout<S>(sizeof(In), workspace_bytes<S>()).total);
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = S::CS > 1 ? 1 : 0;
  return cfg;
}

// CTAs of the kernel that fit on the device at once (a multiple of CS; 0: it cannot run there).
// Raises the kernel's dynamic shared-memory limit first; both once per device, before any CUDA
// graph capture (a warm-up call), under a lock.
template <class S, typename In>
int64_t resident(int device) {
  static std::mutex mu;
  static std::array<int64_t, 64> cache{};  // 0 unknown, else resident + 1
  std::lock_guard<std::mutex> lock(mu);
  if (device >= 0 && device < 64 && cache[device] != 0) return cache[device] - 1;
  C10_CUDA_CHECK(cudaPeekAtLastError());  // a pending error must surface as itself, not be cleared below
  // Host-side set-up, allowed even when the first call of a size comes inside a CUDA graph capture.
  const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
  auto* kernel = dx_kernel<S, In>;
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = launch_config<S, In>(S::CS, nullptr, attr);
  int64_t n = 0;
  bool ok = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(cfg.dynamicSmemBytes)) == cudaSuccess;
  if (ok && S::CS == 1) {
    int per_sm = 0, sms = 0;
    ok = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, S::threads, cfg.dynamicSmemBytes) ==
             cudaSuccess &&
         cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess;
    n = ok ? static_cast<int64_t>(per_sm) * sms : 0;
  } else if (ok) {
    int clusters = 0;
    ok = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) == cudaSuccess;
    n = ok ? static_cast<int64_t>(clusters) * S::CS : 0;
  }
  if (!ok) (void)cudaGetLastError();  // our own failed query must not look like a failed launch later
  if (device >= 0 && device < 64) cache[device] = n + 1;
  return n;
}

// SGS_DX_MAX_CLUSTERS=<n> (tests only: benchmarks/gpu_check.sh's sanitizer runs) caps the grid, so
// that each cluster loops over several plane groups and reuses its buffers; 0 or unset: no cap.
inline int64_t max_clusters_for_tests() {
  static const int64_t cap = [] {
    const char* v = std::getenv("SGS_DX_MAX_CLUSTERS");
    return v == nullptr ? int64_t{0} : static_cast<int64_t>(std::strtoll(v, nullptr, 10));
  }();
  return cap;
}

template <class S, typename In>
void launch(const Call& c) {
  const int64_t groups = (c.planes + S::P - 1) / S::P;
  int64_t capacity = resident<S, In>(c.device) / S::CS;  // clusters at once (> 0: dx::applies)
  if (max_clusters_for_tests() > 0 && max_clusters_for_tests() < capacity) capacity = max_clusters_for_tests();
  const int64_t clusters = groups < capacity ? groups : capacity;
  Args<In> a{static_cast<const In*>(c.grads), c.assign, static_cast<In*>(c.update), c.stats, c.planes, c.channels,
             c.domains, c.p};
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = launch_config<S, In>(static_cast<unsigned>(clusters * S::CS), c.stream, attr);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, dx_kernel<S, In>, a));
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
std::array<int64_t, 3> resources() {  // float32 input
  using S = typename Config<H, W>::S;
  return {S::threads, layout<S>(sizeof(float), workspace_bytes<S>()).total, S::CS};
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

template <int H, int W>
int64_t resident_ctas(InType t, int device) {
  using S = typename Config<H, W>::S;
  switch (t) {
    case InType::kHalf: return resident<S, __half>(device);
    case InType::kBFloat16: return resident<S, __nv_bfloat16>(device);
    default: return resident<S, float>(device);
  }
}

#define SGS_DX_INSTANTIATE(h, w)                     \
  template void run_size<h, w>(const Call&);         \
  template std::array<int64_t, 3> resources<h, w>(); \
  template int binary_version<h, w>();               \
  template int64_t resident_ctas<h, w>(InType, int);

}  // namespace dx
}  // namespace sgs
