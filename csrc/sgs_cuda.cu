// CUDA kernels of sgs::surgery (spec sections 3 and 5): a ladder of three paths, the fastest that
// applies unless SGS_CUDA_PATH=dx|portable|cufft forces one (auto: the default). The Python side
// checks a path on its first use (sgs_cuda/selfcheck.py) and disables one that disagrees with the
// float64 reference for that class of calls (sgs::disable_cuda_path): auto then skips it. Both
// fused paths take D <= 127 domains (the sign counts); an out-of-range assign raises on every path.
//   dx       the cuFFTDx kernel (sgs_cuda_dx*.cu, sgs_dx.h): compile-time specialised sizes
//            (SGS_DX_SIZES, 128x128 on a 2-CTA cluster), float32/float16/bfloat16, the update and
//            (sgs::surgery_stats) the diagnostic sums, sm_90; built only when nvidia-mathdx is
//            installed (SGS_WITH_DX);
//   portable the fused kernel below: any even W whose lengths factor into primes <= 13, on one
//            CTA or a thread-block cluster; also the path for return_parts and float64;
//   cufft    cuFFT (at::fft_rfft2) plus one kernel over the bins, for everything else.
//
// Portable (fused) path: one pass per (image, channel) plane. A thread block (or a cluster of `cs` thread
// blocks, see below) reads the D domain planes of its plane once from global memory, runs the 2-D
// real FFT in shared memory with the Stockham stages of sgs_math.h (one thread per (butterfly j,
// lane l) pair, __syncthreads between stages, ping-pong buffers), folds each domain's spectrum into
// the single-pass per-bin statistics (stats_first / stats_add), recombines every bin with
// recombine_bin, runs one inverse transform and writes the update once. Memory traffic: D reads
// and one write of each plane (plus the shared/diversity planes and a separate ATen mean when the
// parts are requested).
//
// Per-plane sequence (M = W/2 row transform length, Wr = W/2 + 1 half-spectrum columns):
//   for each domain d, the assigned domain assign[n] LAST:
//     load: the plane's rows into A as packed complex rows z[j] = x[2j] + i x[2j+1], lanes = rows
//     row FFT (length M) A <-> B; real_unpack into the half-spectrum S [H][Wr]
//     column FFT (length H) S <-> S2; per bin: stats_first / stats_add. For the last (assigned)
//     domain its spectrum Fa is right there in the FFT buffer: recombine_bin writes the combined
//     spectrum Fbar + alpha Sh + beta V in place (no separate Fa storage), and, with parts, Sh and
//     V over the statistics arrays that are no longer needed.
//   inverse: column iFFT, real_pack_inverse into A, row iFFT, scale 1/(H*M), write the plane.
//
// Shared memory per thread block (all offsets come from plan_fused, a plain host function that
// tests/test_cuda_build.py also runs): twiddle tables, compact per-bin statistics (4 values of T
// plus two int8 sign counts = 18 bytes per bin in float32), the half-spectrum S, and one region
// that holds the row buffers A, B during the row transforms and S2 (S's column ping-pong partner)
// during the column transforms. Strides are padded to odd values so that the strided accesses of
// the transposes hit distinct banks. Float32 (half/bfloat16 inputs alike), H = W, one block per
// plane: 28x28: 18.1 KB (224 threads), 32x32: 23.2 KB (256), 64x64: 87.9 KB (256; 512 items per
// FFT stage). The kernel uses ~96 registers per thread (no spills), so registers, not shared
// memory, bound the residency at 32x32 and 64x64 (16 warps per SM).
// 128x128 needs S and S2 (2 x 66.5 KB), the row buffers and 8320 bins of statistics (150 KB):
// about 350 KB, more than the 227 KB a block may have. It runs on a 2-CTA thread block cluster
// (Hopper, distributed shared memory): CTA r does the row transforms of rows [64r, 64r+64) and
// owns half-spectrum columns [33r, 33r+33) (the columns and their statistics), so each CTA holds
// half of every buffer: 175.3 KB, 512 threads. real_unpack writes each value into the smem of the CTA that owns
// its column (map_shared_rank), and real_pack_inverse reads from there; cluster barriers separate
// the phases. The planner tries cs = 1, 2, 4, 8 until the layout fits (float64 128x128: cs = 4),
// and every size or device that does not fit takes the fallback path.
//
// Fallback path (odd W, large planes, D > 127, lengths with a prime factor > 13, no cluster
// support): at::fft_rfft2 (cuFFT) over the whole [D, N, C, H, W], one elementwise kernel over the
// bins (statistics over D + recombine_bin, reads the D spectra once, writes the combined spectrum),
// at::fft_irfft2.
//
// Both paths: the imaginary parts of the self-conjugate bins are set to zero before the
// statistics, as the CPU kernel does; the hard mask is an exact integer and product test
// (SurgeryParams::kstar, rho2), so approximate device division cannot flip it; per-plane (fused) or per-block (fallback) partial diagnostics
// are reduced with at::sum (deterministic, no atomics; the dx kernel adds one partial sum per CTA
// with atomicAdd, so its float64 energy sums may differ in the last bits from run to run); no host synchronisation anywhere (CUDA graph
// capture works for the fused path).
//
// Options (read from the environment once, when the library loads; sgs::set_cuda_options changes
// them at run time for tests and benchmarks): SGS_CUDA_PATH=auto|dx|portable|cufft (a forced path
// raises if it cannot take the input; fused/fallback are the old names of portable/cufft),
// SGS_CUDA_SMEM_LIMIT=<bytes> lowers the portable kernel's shared-memory budget (to exercise its
// cluster path at small sizes).
//
// Compiled with -DSGS_EMULATE (no torch, no CUDA), this file exposes only the planner and the
// block-level algorithm, templated on an execution context: tests/test_cuda_build.py runs it on the
// host with one std::thread per CTA of a cluster and compares with the float64 reference.
#include <cstdint>
#include <limits>

#include "sgs_math.h"

#if defined(SGS_EMULATE)
#include <cassert>
#define SGS_DEV
#define SGS_ASSERT(cond) assert(cond)
#else
// Narrow headers on purpose: ATen/cuda/CUDAContext.h includes cuSPARSE/cuBLAS headers that a bare
// toolkit may lack (device attributes are queried directly instead). torch's headers need C++20.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "sgs_ops.h"
#include "sgs_dx_api.h"
#include <torch/library.h>
#include <atomic>
#define SGS_DEV __device__
#define SGS_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)
#endif

namespace sgs {
namespace cuda_detail {

constexpr int kMaxThreads = 512;       // threads per block of the fused kernel
constexpr int kMaxFusedRadix = 13;     // largest prime factor of M and H the fused path accepts
constexpr int kMaxFusedDomains = 127;  // the sign counts are stored as int8
constexpr int kMaxCluster = 8;         // portable cluster size

inline int64_t align16(int64_t x) { return (x + 15) & ~static_cast<int64_t>(15); }
inline int odd_stride(int x) { return x % 2 == 0 ? x + 1 : x; }

inline int largest_prime_factor(int n) {
  int largest = 1;
  for (int q = 2; q * q <= n; ++q)
    while (n % q == 0) {
      largest = q;
      n /= q;
    }
  return n > 1 ? n : largest;
}

// Most work items of one pass over the given lanes: n/R butterflies per lane for the smallest R.
inline int max_stage_items(const FftPlan& p, int lanes) {
  int m = 0;
  for (int f = 0; f < p.nfactors; ++f) {
    const int items = p.n / p.factors[f] * lanes;
    m = items > m ? items : m;
  }
  return m;
}

// Shape of the fused kernel for one plane size and compute type: cluster size, per-CTA row and
// column ranges, padded strides, threads, and the byte offsets of every shared-memory array.
struct FusedPlan {
  int ok;  // 0: the fused path cannot hold this size within the budget
  int H, W, M, Wr;
  int cs;                        // CTAs per plane (cluster size; 1 = plain launch)
  int rows_per_cta, cols_per_cta;  // CTA r: rows [r*rows_per_cta, ...), columns [r*cols_per_cta, ...)
  int rs;                        // stride of the row buffers A, B ([M][rs], lanes = own rows)
  int ks;                        // stride of the half-spectrum arrays ([H][ks], lanes = own columns)
  int threads;
  int64_t smem;  // dynamic shared memory per CTA, bytes
  int64_t off_red, off_tw_re, off_tw_im;
  int64_t off_sum_re, off_sum_im, off_min2, off_max2, off_sgn_re, off_sgn_im;
  int64_t off_s_re, off_s_im, off_s2_re, off_s2_im, off_a_re, off_a_im, off_b_re, off_b_im;
};

// elem: sizeof the compute type. smem_limit: bytes one CTA may use. max_cluster: 1 where clusters
// cannot be launched.
inline FusedPlan plan_fused(int H, int W, int64_t D, int elem, int64_t smem_limit, int max_cluster) {
  FusedPlan q{};
  q.ok = 0;
  if (H < 1 || W < 2 || W % 2 != 0 || D < 1 || D > kMaxFusedDomains) return q;
  const int M = W / 2, Wr = M + 1;
  if (largest_prime_factor(M) > kMaxFusedRadix || largest_prime_factor(H) > kMaxFusedRadix) return q;
  const FftPlan prow = make_plan(M), pcol = make_plan(H);
  for (int cs = 1; cs <= max_cluster && cs <= kMaxCluster; cs *= 2) {
    if (cs > 1 && (cs > H || cs > Wr)) break;
    const int hh = (H + cs - 1) / cs, kw = (Wr + cs - 1) / cs;
    const int rs = odd_stride(hh), ks = odd_stride(kw);
    int64_t off = 0;
    auto take = [&off](int64_t bytes) {
      const int64_t o = off;
      off += align16(bytes);
      return o;
    };
    q.off_red = take((kMaxThreads / 32) * 4 * static_cast<int64_t>(sizeof(double)));
    const int64_t ntw = static_cast<int64_t>(M) + H + Wr;
    q.off_tw_re = take(ntw * elem);
    q.off_tw_im = take(ntw * elem);
    const int64_t bins = static_cast<int64_t>(H) * ks;
    q.off_sum_re = take(bins * elem);
    q.off_sum_im = take(bins * elem);
    q.off_min2 = take(bins * elem);
    q.off_max2 = take(bins * elem);
    q.off_sgn_re = take(bins);
    q.off_sgn_im = take(bins);
    q.off_s_re = take(bins * elem);
    q.off_s_im = take(bins * elem);
    // Region 2: S2 (column pass) and B (row pass) share its start; A follows both. (A could
    // overlap S2 as well, since the column result that real_pack_inverse reads while it writes
    // A always ends in S, SUM or MM; keeping A clear of S2 costs 8*H bytes and does not depend
    // on that parity argument.)
    const int64_t base2 = off;
    const int64_t sbuf = align16(bins * elem), rbuf = align16(static_cast<int64_t>(M) * rs * elem);
    q.off_s2_re = base2;
    q.off_s2_im = base2 + sbuf;
    q.off_b_re = base2;
    q.off_b_im = base2 + rbuf;
    q.off_a_re = base2 + (2 * sbuf > 2 * rbuf ? 2 * sbuf : 2 * rbuf);
    q.off_a_im = q.off_a_re + rbuf;
    q.smem = q.off_a_im + rbuf;
    if (q.smem > smem_limit) continue;
    int items = max_stage_items(prow, hh);
    const int others[4] = {max_stage_items(pcol, kw), M * hh, Wr * hh, H * kw};
    for (int o : others) items = o > items ? o : items;
    // About two work items per thread. The kernel needs ~96 registers per thread, so a
    // 512-thread block runs alone on an SM; where two blocks fit in shared memory, 256-thread
    // blocks let one block's barrier stalls overlap with the other's work.
    const int cap = 2 * q.smem <= smem_limit ? kMaxThreads / 2 : kMaxThreads;
    int threads = ((items + 1) / 2 + 31) / 32 * 32;
    threads = threads < 64 ? 64 : (threads > cap ? cap : threads);
    q.ok = 1;
    q.H = H, q.W = W, q.M = M, q.Wr = Wr, q.cs = cs;
    q.rows_per_cta = hh, q.cols_per_cta = kw, q.rs = rs, q.ks = ks, q.threads = threads;
    return q;
  }
  q.ok = 0;
  return q;
}

template <typename In, typename T>
struct FusedArgs {
  const In* grads;        // [D, planes, H, W]
  const int64_t* assign;  // [N]
  In* update;             // [planes, H, W]
  In* shared;             // [planes, H, W] (parts only)
  In* diversity;          // [planes, H, W] (parts only)
  double* plane_stats;    // [planes * cs, 4] (sums only)
  int64_t planes, channels;
  int domains;
  bool parts;  // shared and diversity (implies sums)
  bool sums;   // the diagnostic sums (plane_stats)
  SurgeryParams<T> p;
  FusedPlan plan;
  FftPlan rows, cols;  // length M and length H
};

template <typename T>
struct Cbuf {
  T* re;
  T* im;
};

SGS_DEV inline int imin(int a, int b) { return a < b ? a : b; }

// Lane-batched complex FFT of `lanes` lanes (element e of lane l at e * stride + l), ping-pong
// between `in` and `out`; returns the buffer that holds the result. Expects the input visible to
// all threads (a barrier before the call); ends with a barrier.
template <class Ctx, typename T>
SGS_DEV Cbuf<T> block_fft(Ctx& ctx, const FftPlan& plan, const T* tw_re, const T* tw_im, bool inverse,
                          Cbuf<T> in, Cbuf<T> out, int stride, int lanes) {
  const int n = plan.n;
  int Ns = 1;
  for (int f = 0; f < plan.nfactors; ++f) {
    const int R = plan.factors[f];
    ctx.for_each(n / R * lanes, [&](int i) {
      const int j = i / lanes, l = i - j * lanes;
      fft_stage<T>(n, R, Ns, j, inverse, tw_re, tw_im, in.re, in.im, out.re, out.im, stride, l, l + 1);
    });
    ctx.sync();
    const Cbuf<T> t = in;
    in = out;
    out = t;
    Ns *= R;
  }
  return in;
}

// The whole fused computation of one plane by CTA `rank` of its cluster. Ctx supplies
// for_each(count, f) (f(i) for every i in [0, count), spread over the threads), sync() (block
// barrier), cluster_sync() (cluster barrier), remote(ptr, rank) (the same shared-memory object in
// CTA `rank`), leader() and reduce_sum4(v) (block sum, valid on the leader).
template <class Ctx, typename In, typename T>
SGS_DEV void fused_plane(Ctx& ctx, const FusedArgs<In, T>& a, unsigned char* smem, int64_t plane, int rank) {
  const FusedPlan& P = a.plan;
  const int H = P.H, W = P.W, M = P.M, Wr = P.Wr, rs = P.rs, ks = P.ks, cpc = P.cols_per_cta;
  const int h_lo = imin(H, rank * P.rows_per_cta), nh = imin(H, h_lo + P.rows_per_cta) - h_lo;
  const int k_lo = imin(Wr, rank * cpc), nk = imin(Wr, k_lo + cpc) - k_lo;
  auto arr = [smem](int64_t off) { return reinterpret_cast<T*>(smem + off); };
  T* const tw_re = arr(P.off_tw_re);
  T* const tw_im = arr(P.off_tw_im);
  const T* const twr_re = tw_re;              // exp(-2 pi i k / M), k < M: row transforms
  const T* const twr_im = tw_im;
  const T* const twc_re = tw_re + M;          // exp(-2 pi i k / H), k < H: column transforms
  const T* const twc_im = tw_im + M;
  const T* const tww_re = tw_re + M + H;      // exp(-2 pi i k / W), k < Wr: real (un)packing
  const T* const tww_im = tw_im + M + H;
  T* const sum_re = arr(P.off_sum_re);
  T* const sum_im = arr(P.off_sum_im);
  T* const min2 = arr(P.off_min2);
  T* const max2 = arr(P.off_max2);
  int8_t* const sgn_re = reinterpret_cast<int8_t*>(smem + P.off_sgn_re);
  int8_t* const sgn_im = reinterpret_cast<int8_t*>(smem + P.off_sgn_im);
  const Cbuf<T> S{arr(P.off_s_re), arr(P.off_s_im)};
  const Cbuf<T> S2{arr(P.off_s2_re), arr(P.off_s2_im)};
  const Cbuf<T> A{arr(P.off_a_re), arr(P.off_a_im)};
  const Cbuf<T> B{arr(P.off_b_re), arr(P.off_b_im)};
  const Cbuf<T> SUM{sum_re, sum_im};  // holds Sh after the recombination (parts)
  const Cbuf<T> MM{min2, max2};       // holds V after the recombination (parts)

  ctx.for_each(M + H + Wr, [&](int i) {
    double wr, wi;
    if (i < M)
      twiddle(i, M, wr, wi);
    else if (i < M + H)
      twiddle(i - M, H, wr, wi);
    else
      twiddle(i - M - H, W, wr, wi);
    tw_re[i] = static_cast<T>(wr);
    tw_im[i] = static_cast<T>(wi);
  });
  ctx.sync();

  const int D = a.domains;
  int64_t asg = a.assign[plane / a.channels];
  SGS_ASSERT(asg >= 0 && asg < D);
  asg = asg < 0 ? 0 : (asg >= D ? D - 1 : asg);
  const int ad = static_cast<int>(asg);
  const int64_t plane_elems = static_cast<int64_t>(H) * W;
  double acc[4] = {0.0, 0.0, 0.0, 0.0};  // mask sum, 2 * bins, |Sh|^2, |Fbar|^2
  Cbuf<T> F{nullptr, nullptr};

  for (int step = 0; step < D; ++step) {
    // Domains other than the assigned one in increasing order, then the assigned one.
    const int d = step == D - 1 ? ad : (step < ad ? step : step + 1);
    const bool first = step == 0, last = step == D - 1;
    const In* x = a.grads + (static_cast<int64_t>(d) * a.planes + plane) * plane_elems +
                  static_cast<int64_t>(h_lo) * W;
    ctx.for_each(nh * M, [&](int i) {  // consecutive threads read consecutive pairs of a row
      const int hl = i / M, j = i - hl * M;
      const In* row = x + static_cast<int64_t>(hl) * W;
      A.re[j * rs + hl] = static_cast<T>(row[2 * j]);
      A.im[j * rs + hl] = static_cast<T>(row[2 * j + 1]);
    });
    ctx.sync();
    const Cbuf<T> Z = block_fft(ctx, a.rows, twr_re, twr_im, false, A, B, rs, nh);
    ctx.cluster_sync();  // every CTA is done with its S of the previous domain
    ctx.for_each(Wr * nh, [&](int i) {  // real_unpack into S, in the CTA that owns column k
      const int k = i / nh, hl = i - k * nh;
      const int zk = (k % M) * rs + hl, zc = ((M - k) % M) * rs + hl;
      const int owner = k / cpc, dst = (h_lo + hl) * ks + (k - owner * cpc);
      T* const dre = ctx.remote(S.re, owner);
      T* const dim = ctx.remote(S.im, owner);
      real_unpack(Z.re[zk], Z.im[zk], Z.re[zc], Z.im[zc], tww_re[k], tww_im[k], dre[dst], dim[dst]);
    });
    ctx.cluster_sync();  // S complete in every CTA
    F = block_fft(ctx, a.cols, twc_re, twc_im, false, S, S2, ks, nk);
    ctx.for_each(H * nk, [&](int i) {
      const int h = i / nk, kl = i - h * nk, k = k_lo + kl, b = h * ks + kl;
      const T re = F.re[b];
      // Self-conjugate bins are real for real input: drop the rounding noise of Im, as the CPU does.
      const T im = ((h == 0 || (H % 2 == 0 && h == H / 2)) && (k == 0 || k == M)) ? T(0) : F.im[b];
      BinStats<T> s{};
      if (first) {
        stats_first(s, re, im);
      } else {
        s.sum_re = sum_re[b];
        s.sum_im = sum_im[b];
        s.min2 = min2[b];
        s.max2 = max2[b];
        s.sgn_re = sgn_re[b];
        s.sgn_im = sgn_im[b];
        stats_add(s, re, im);
      }
      if (!last) {
        sum_re[b] = s.sum_re;
        sum_im[b] = s.sum_im;
        min2[b] = s.min2;
        max2[b] = s.max2;
        sgn_re[b] = static_cast<int8_t>(s.sgn_re);
        sgn_im[b] = static_cast<int8_t>(s.sgn_im);
      } else {  // this is the assigned domain: Fa = (re, im)
        const BinResult<T> r = recombine_bin(a.p, s, re, im);
        F.re[b] = r.upd_re;
        F.im[b] = r.upd_im;
        if (a.parts) {
          sum_re[b] = r.sh_re;
          sum_im[b] = r.sh_im;
          min2[b] = r.div_re;
          max2[b] = r.div_im;
        }
        if (a.sums) {
          acc[0] += static_cast<double>(r.mask_re) + static_cast<double>(r.mask_im);
          acc[1] += 2.0;
          acc[2] += static_cast<double>(r.sh_re) * r.sh_re + static_cast<double>(r.sh_im) * r.sh_im;
          acc[3] += static_cast<double>(r.mean_re) * r.mean_re + static_cast<double>(r.mean_im) * r.mean_im;
        }
      }
    });
    ctx.sync();
  }

  if (a.sums) {
    ctx.reduce_sum4(acc);
    if (ctx.leader()) {
      double* o = a.plane_stats + (plane * P.cs + rank) * 4;
      for (int q = 0; q < 4; ++q) o[q] = acc[q];
    }
  }

  // irfft2 of the half-spectrum in X (S, S2, SUM or MM, distributed by columns) into out.
  const T scale = T(1) / static_cast<T>(H * M);
  auto inverse = [&](const Cbuf<T>& X, In* out) {
    const Cbuf<T> Y = X.re == S.re ? S2 : S;
    const Cbuf<T> R = block_fft(ctx, a.cols, twc_re, twc_im, true, X, Y, ks, nk);
    ctx.cluster_sync();  // R complete in every CTA
    ctx.for_each(M * nh, [&](int i) {
      const int k = i / nh, hl = i - k * nh, h = h_lo + hl, kc = M - k;
      const int ok = k / cpc, oc = kc / cpc;
      const T* const kre = ctx.remote(R.re, ok);
      const T* const kim = ctx.remote(R.im, ok);
      const T* const cre = ctx.remote(R.re, oc);
      const T* const cim = ctx.remote(R.im, oc);
      const int bk = h * ks + (k - ok * cpc), bc = h * ks + (kc - oc * cpc);
      real_pack_inverse(k, kre[bk], kim[bk], cre[bc], cim[bc], tww_re[k], tww_im[k], A.re[k * rs + hl],
                        A.im[k * rs + hl]);
    });
    ctx.cluster_sync();  // nobody reads R any more (B overlaps S2)
    const Cbuf<T> Q = block_fft(ctx, a.rows, twr_re, twr_im, true, A, B, rs, nh);
    In* const o = out + plane * plane_elems + static_cast<int64_t>(h_lo) * W;
    ctx.for_each(nh * M, [&](int i) {
      const int hl = i / M, j = i - hl * M;
      In* const row = o + static_cast<int64_t>(hl) * W;
      row[2 * j] = static_cast<In>(Q.re[j * rs + hl] * scale);
      row[2 * j + 1] = static_cast<In>(Q.im[j * rs + hl] * scale);
    });
    ctx.sync();
  };
  inverse(F, a.update);
  if (a.parts) {
    inverse(SUM, a.shared);
    inverse(MM, a.diversity);
  }
}

// Fallback: statistics and recombination of one bin from the D spectra [D][nb] (complex, split
// into re/im pairs), as the fused kernel does it (same domain order, same self-conjugate rule).
template <typename T>
struct BinsArgs {
  const T* spec;          // [D, nb, 2]
  const int64_t* assign;  // [N]
  T* upd;                 // [nb, 2]
  T* sh;                  // [nb, 2] (parts only)
  T* dv;                  // [nb, 2] (parts only)
  double* block_stats;    // [blocks, 4] (sums only)
  int64_t nb, per_image;  // bins in all, bins per image (C * H * Wr)
  int H, W, Wr, domains;
  bool parts;  // sh and dv (implies sums)
  bool sums;   // the diagnostic sums (block_stats)
  SurgeryParams<T> p;
};

template <typename T>
SGS_DEV void recombine_spectra_bin(const BinsArgs<T>& a, int64_t b, double acc[4]) {
  const int k = static_cast<int>(b % a.Wr), h = static_cast<int>((b / a.Wr) % a.H);
  const int D = a.domains;
  int64_t asg = a.assign[b / a.per_image];
  SGS_ASSERT(asg >= 0 && asg < D);
  asg = asg < 0 ? 0 : (asg >= D ? D - 1 : asg);
  const int ad = static_cast<int>(asg);
  const bool selfconj = (h == 0 || (a.H % 2 == 0 && h == a.H / 2)) && (k == 0 || (a.W % 2 == 0 && k == a.W / 2));
  BinStats<T> s{};
  T fa_re = T(0), fa_im = T(0);
  for (int step = 0; step < D; ++step) {
    const int d = step == D - 1 ? ad : (step < ad ? step : step + 1);
    const T* v = a.spec + 2 * (static_cast<int64_t>(d) * a.nb + b);
    const T re = v[0], im = selfconj ? T(0) : v[1];
    if (step == 0)
      stats_first(s, re, im);
    else
      stats_add(s, re, im);
    fa_re = re;
    fa_im = im;
  }
  const BinResult<T> r = recombine_bin(a.p, s, fa_re, fa_im);
  a.upd[2 * b] = r.upd_re;
  a.upd[2 * b + 1] = r.upd_im;
  if (a.parts) {
    a.sh[2 * b] = r.sh_re;
    a.sh[2 * b + 1] = r.sh_im;
    a.dv[2 * b] = r.div_re;
    a.dv[2 * b + 1] = r.div_im;
  }
  if (a.sums) {
    acc[0] += static_cast<double>(r.mask_re) + static_cast<double>(r.mask_im);
    acc[1] += 2.0;
    acc[2] += static_cast<double>(r.sh_re) * r.sh_re + static_cast<double>(r.sh_im) * r.sh_im;
    acc[3] += static_cast<double>(r.mean_re) * r.mean_re + static_cast<double>(r.mean_im) * r.mean_im;
  }
}

}  // namespace cuda_detail
}  // namespace sgs

#if !defined(SGS_EMULATE)

namespace sgs {
namespace cuda_detail {
namespace {

namespace cg = cooperative_groups;

// Block sum of v[4] (blockDim.x a multiple of 32); the result is valid in thread 0.
__device__ __forceinline__ void block_reduce4(double v[4], double* scratch) {
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[q] += __shfl_down_sync(0xffffffffu, v[q], off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0)
#pragma unroll
    for (int q = 0; q < 4; ++q) scratch[warp * 4 + q] = v[q];
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      double s = 0.0;
      for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) s += scratch[w * 4 + q];
      v[q] = s;
    }
  }
}

template <bool kCluster>
struct DeviceCtx {
  double* red;
  int rank;
  __device__ void sync() { __syncthreads(); }
  __device__ void cluster_sync() {
    if constexpr (kCluster) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
      cg::this_cluster().sync();
#else
      __trap();
#endif
    } else {
      __syncthreads();
    }
  }
  template <class F>
  __device__ void for_each(int count, F&& f) {
    for (int i = threadIdx.x; i < count; i += blockDim.x) f(i);
  }
  template <typename P>
  __device__ P* remote(P* p, int r) {
    if constexpr (kCluster) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
      return r == rank ? p : cg::this_cluster().map_shared_rank(p, r);
#else
      __trap();
      return p;
#endif
    } else {
      return p;
    }
  }
  __device__ bool leader() const { return threadIdx.x == 0; }
  __device__ void reduce_sum4(double v[4]) { block_reduce4(v, red); }
};

template <typename In, typename T, bool kCluster>
__global__ void __launch_bounds__(kMaxThreads) sgs_fused_kernel(const __grid_constant__ FusedArgs<In, T> a) {
  extern __shared__ __align__(16) unsigned char sgs_smem[];
  DeviceCtx<kCluster> ctx;
  ctx.red = reinterpret_cast<double*>(sgs_smem + a.plan.off_red);
  ctx.rank = 0;
  if constexpr (kCluster) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    ctx.rank = static_cast<int>(cg::this_cluster().block_rank());
#else
    __trap();
#endif
  }
  const int64_t plane = static_cast<int64_t>(blockIdx.x) / a.plan.cs;
  fused_plane(ctx, a, sgs_smem, plane, ctx.rank);
}

constexpr int kBinsThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kBinsThreads) sgs_bins_kernel(const BinsArgs<T> a) {
  __shared__ double scratch[(kBinsThreads / 32) * 4];
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < a.nb; b += stride)
    recombine_spectra_bin(a, b, acc);
  if (a.sums) {
    block_reduce4(acc, scratch);
    if (threadIdx.x == 0)
      for (int q = 0; q < 4; ++q) a.block_stats[static_cast<int64_t>(blockIdx.x) * 4 + q] = acc[q];
  }
}

enum class Path : int { kAuto = 0, kDx = 1, kPortable = 2, kCufft = 3 };

Path parse_path(const char* v) {
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return Path::kAuto;
  if (std::strcmp(v, "dx") == 0) return Path::kDx;
  if (std::strcmp(v, "portable") == 0 || std::strcmp(v, "fused") == 0) return Path::kPortable;
  if (std::strcmp(v, "cufft") == 0 || std::strcmp(v, "fallback") == 0) return Path::kCufft;
  TORCH_CHECK(false, "SGS_CUDA_PATH must be auto, dx, portable or cufft, got '", v, "'");
}

const char* path_name(Path p) {
  switch (p) {
    case Path::kDx: return "dx";
    case Path::kPortable: return "portable";
    case Path::kCufft: return "cufft";
    default: return "auto";
  }
}

// The options, read from the environment once (not on every call).
struct Options {
  std::atomic<int> path;
  std::atomic<int64_t> smem_limit;  // -1: the device's limit
  Options() {
    path = static_cast<int>(parse_path(std::getenv("SGS_CUDA_PATH")));
    const char* v = std::getenv("SGS_CUDA_SMEM_LIMIT");
    smem_limit = (v == nullptr || *v == '\0') ? -1 : std::strtoll(v, nullptr, 10);
  }
};

Options& options() {
  static Options o;
  return o;
}

// Paths the first-use self-check (sgs_cuda/selfcheck.py) found wrong, per (device, H, W, D,
// dtype): auto skips them, a forced path that is disabled raises. Set through
// sgs::disable_cuda_path; read under a lock on every call (a handful of entries at most).
struct DisabledKey {
  int device, H, W;
  int64_t D;
  int dtype, path;
  bool operator==(const DisabledKey& o) const {
    return device == o.device && H == o.H && W == o.W && D == o.D && dtype == o.dtype && path == o.path;
  }
};

std::mutex& disabled_mutex() {
  static std::mutex mu;
  return mu;
}

std::vector<DisabledKey>& disabled_paths() {  // call with disabled_mutex() held
  static std::vector<DisabledKey> v;
  return v;
}

bool path_disabled(const at::Tensor& grads, Path p) {
  const DisabledKey k{grads.get_device(), static_cast<int>(grads.size(3)), static_cast<int>(grads.size(4)),
                      grads.size(0), static_cast<int>(grads.scalar_type()), static_cast<int>(p)};
  std::lock_guard<std::mutex> lock(disabled_mutex());
  for (const auto& e : disabled_paths())
    if (e == k) return true;
  return false;
}

// A CUDA error left pending by earlier work must surface as itself, not be cleared by (or blamed
// on) the host-side queries below.
void raise_pending_error() { C10_CUDA_CHECK(cudaPeekAtLastError()); }

// The few device attributes the planner needs (cudaDeviceGetAttribute is cheap, unlike
// cudaGetDeviceProperties).
struct DeviceInfo {
  int smem_optin, major, sms;
};

// Everything cached per device, under one lock: its attributes, the dynamic shared-memory limit
// set per kernel (so that a warmed-up call, as CUDA graph capture requires anyway, makes no such
// call during capture), each kernel's static shared memory and whether a cluster plan can launch.
struct DeviceCache {
  bool have_info = false;
  DeviceInfo info{};
  std::vector<std::pair<const void*, int64_t>> smem_set, static_smem;
  std::vector<std::pair<std::array<int64_t, 4>, bool>> cluster_ok;  // (kernel, cs, threads, smem)
};

std::mutex& cache_mutex() {
  static std::mutex mu;
  return mu;
}

DeviceCache& device_cache(int device) {  // call with cache_mutex() held
  static std::vector<DeviceCache> caches;
  if (device >= static_cast<int>(caches.size())) caches.resize(device + 1);
  return caches[device];
}

DeviceInfo device_info(int device) {
  std::lock_guard<std::mutex> lock(cache_mutex());
  DeviceCache& c = device_cache(device);
  if (!c.have_info) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&c.info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&c.info.major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&c.info.sms, cudaDevAttrMultiProcessorCount, device));
    c.have_info = true;
  }
  return c.info;
}

void ensure_smem_attribute_locked(DeviceCache& c, const void* kernel, int64_t bytes) {
  for (const auto& e : c.smem_set)
    if (e.first == kernel && e.second >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  c.smem_set.emplace_back(kernel, bytes);
}

void ensure_smem_attribute(const void* kernel, int64_t bytes, int device) {
  std::lock_guard<std::mutex> lock(cache_mutex());
  ensure_smem_attribute_locked(device_cache(device), kernel, bytes);
}

// Static shared memory of a kernel (none is declared; queried to be safe).
int64_t static_smem(const void* kernel, int device) {
  std::lock_guard<std::mutex> lock(cache_mutex());
  DeviceCache& c = device_cache(device);
  for (const auto& e : c.static_smem)
    if (e.first == kernel) return e.second;
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  c.static_smem.emplace_back(kernel, static_cast<int64_t>(attr.sharedSizeBytes));
  return static_cast<int64_t>(attr.sharedSizeBytes);
}

// The launch configuration of `blocks` blocks in clusters of plan.cs; it points at `cluster_dim`,
// which must outlive it.
cudaLaunchConfig_t cluster_config(const FusedPlan& plan, unsigned blocks, cudaStream_t stream,
                                  cudaLaunchAttribute& cluster_dim) {
  cluster_dim.id = cudaLaunchAttributeClusterDimension;
  cluster_dim.val.clusterDim.x = static_cast<unsigned>(plan.cs);
  cluster_dim.val.clusterDim.y = 1;
  cluster_dim.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(static_cast<unsigned>(plan.threads));
  cfg.dynamicSmemBytes = static_cast<size_t>(plan.smem);
  cfg.stream = stream;
  cfg.attrs = &cluster_dim;
  cfg.numAttrs = 1;
  return cfg;
}

// Whether a cluster launch of `kernel` with this plan can run on the current device. Host-side
// queries only (no synchronisation).
bool cluster_launch_possible(const void* kernel, const FusedPlan& plan, int device) {
  raise_pending_error();  // the queries below may fail and are then cleared: nothing else may be
  std::lock_guard<std::mutex> lock(cache_mutex());
  DeviceCache& c = device_cache(device);
  const std::array<int64_t, 4> key{static_cast<int64_t>(reinterpret_cast<uintptr_t>(kernel)), plan.cs, plan.threads,
                                   plan.smem};
  for (const auto& e : c.cluster_ok)
    if (e.first == key) return e.second;
  bool ok = false, failed = false;
  cudaFuncAttributes attr;
  // ptxVersion: code compiled for an older virtual architecture has the cluster paths trapped out.
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    failed = true;
  } else if (attr.ptxVersion >= 90) {
    ensure_smem_attribute_locked(c, kernel, plan.smem);  // only ever raises the limit
    cudaLaunchAttribute cluster_dim;
    const cudaLaunchConfig_t cfg = cluster_config(plan, static_cast<unsigned>(plan.cs), nullptr, cluster_dim);
    int clusters = 0;
    failed = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess;
    ok = !failed && clusters > 0;
  }
  if (failed) (void)cudaGetLastError();  // our own failed query must not look like a failed launch later
  c.cluster_ok.emplace_back(key, ok);
  return ok;
}

// Plans the fused kernel for this device; ok == 0 when it cannot run it.
template <typename In, typename T>
FusedPlan device_plan(int H, int W, int64_t D, int64_t planes, int device) {
  const DeviceInfo dev = device_info(device);
  int64_t limit = dev.smem_optin;
  const int64_t user = options().smem_limit.load();
  if (user >= 0 && user < limit) limit = user;
  limit -= static_smem(reinterpret_cast<const void*>(sgs_fused_kernel<In, T, false>), device);
  const int max_cluster = dev.major >= 9 ? kMaxCluster : 1;
  FusedPlan plan = plan_fused(H, W, D, static_cast<int>(sizeof(T)), limit, max_cluster);
  if (plan.ok && planes * plan.cs > static_cast<int64_t>(INT32_MAX)) plan.ok = 0;
  if (plan.ok && plan.cs > 1 &&
      !cluster_launch_possible(reinterpret_cast<const void*>(sgs_fused_kernel<In, T, true>), plan, device))
    plan.ok = 0;
  return plan;
}

template <typename In, typename T>
void launch_fused(const FusedArgs<In, T>& args, cudaStream_t stream, int device) {
  const FusedPlan& plan = args.plan;
  const unsigned blocks = static_cast<unsigned>(args.planes * plan.cs);
  const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);  // see choose_path
  if (plan.cs == 1) {
    auto* kernel = sgs_fused_kernel<In, T, false>;
    ensure_smem_attribute(reinterpret_cast<const void*>(kernel), plan.smem, device);
    kernel<<<blocks, plan.threads, static_cast<size_t>(plan.smem), stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    auto* kernel = sgs_fused_kernel<In, T, true>;
    ensure_smem_attribute(reinterpret_cast<const void*>(kernel), plan.smem, device);
    cudaLaunchAttribute cluster_dim;
    const cudaLaunchConfig_t cfg = cluster_config(plan, blocks, stream, cluster_dim);
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void run_fallback(const at::Tensor& grads, const at::Tensor& assign, const SurgeryParams<T>& p, SurgeryOutputs& outs) {
  const bool parts = outs.parts(), sums = outs.with_stats();
  const int64_t D = grads.size(0), N = grads.size(1), C = grads.size(2);
  const int64_t H = grads.size(3), W = grads.size(4), Wr = W / 2 + 1;
  const at::ScalarType ct = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
  const at::Tensor g = grads.scalar_type() == ct ? grads : grads.to(ct);
  const at::Tensor spec = at::fft_rfft2(g).contiguous();  // [D, N, C, H, Wr] complex
  const int64_t nb = N * C * H * Wr;
  const auto cshape = spec.sizes().slice(1);
  at::Tensor upd = at::empty(cshape, spec.options());
  at::Tensor sh, dv, bstats;
  const int sms = device_info(grads.get_device()).sms;
  const int64_t want = (nb + kBinsThreads - 1) / kBinsThreads, cap = static_cast<int64_t>(sms) * 8;
  const int blocks = static_cast<int>(want < cap ? (want > 0 ? want : 1) : cap);
  if (parts) {
    sh = at::empty(cshape, spec.options());
    dv = at::empty(cshape, spec.options());
  }
  if (sums) bstats = at::empty({blocks, 4}, grads.options().dtype(at::kDouble));
  BinsArgs<T> a;
  a.spec = reinterpret_cast<const T*>(spec.const_data_ptr());
  a.assign = assign.const_data_ptr<int64_t>();
  a.upd = reinterpret_cast<T*>(upd.data_ptr());
  a.sh = parts ? reinterpret_cast<T*>(sh.data_ptr()) : nullptr;
  a.dv = parts ? reinterpret_cast<T*>(dv.data_ptr()) : nullptr;
  a.block_stats = sums ? bstats.data_ptr<double>() : nullptr;
  a.nb = nb;
  a.per_image = C * H * Wr;
  a.H = static_cast<int>(H), a.W = static_cast<int>(W), a.Wr = static_cast<int>(Wr);
  a.domains = static_cast<int>(D);
  a.parts = parts;
  a.sums = sums;
  a.p = p;
  sgs_bins_kernel<T><<<blocks, kBinsThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const std::array<int64_t, 2> s{H, W};
  outs.update.copy_(at::fft_irfft2(upd, at::IntArrayRef(s)));
  if (parts) {
    outs.shared.copy_(at::fft_irfft2(sh, at::IntArrayRef(s)));
    outs.diversity.copy_(at::fft_irfft2(dv, at::IntArrayRef(s)));
  }
  if (sums) outs.stats.copy_(bstats.sum(0));
}

}  // namespace
}  // namespace cuda_detail

namespace cuda_detail {
namespace {

// The input as the kernels read it: contiguous and 16-byte aligned (the dx kernel's cp.async
// needs it), copied if it is not (a view at an odd offset: rare), so that the path never depends
// on where a tensor starts (the self-check checks a path per shape class, not per pointer).
at::Tensor aligned_contiguous(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0 ? c : c.clone();
}

// Out-of-range domains raise the same clear error on every path (one host synchronisation, as the
// Python wrapper's own check). Inside a CUDA graph capture no synchronisation is possible: every
// kernel then asserts on the device instead.
void check_assign_range(const at::Tensor& assign, int64_t D) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &status));
  if (status != cudaStreamCaptureStatusNone || assign.numel() == 0) return;
  const at::Tensor range = at::stack({assign.min(), assign.max()}).cpu();
  const int64_t lo = range[0].item<int64_t>(), hi = range[1].item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < D, "sgs::surgery: assign values must lie in [0, D) = [0, ", D, "), got range [",
                    lo, ", ", hi, "]");
}

// Why the dx kernel cannot take this call ("" if it can).
#if defined(SGS_WITH_DX)
dx::InType dx_in_type(at::ScalarType t) {
  return t == at::kHalf ? dx::InType::kHalf : t == at::kBFloat16 ? dx::InType::kBFloat16 : dx::InType::kFloat;
}
#endif

std::string dx_refusal(const at::Tensor& grads, Outputs what) {
#if defined(SGS_WITH_DX)
  const int H = static_cast<int>(grads.size(3)), W = static_cast<int>(grads.size(4));
  const auto t = grads.scalar_type();
  if (what == Outputs::kParts) return "return_parts takes the portable kernel";
  if (t != at::kFloat && t != at::kHalf && t != at::kBFloat16) return "float64 takes the portable kernel";
  // The packed per-bin sign counts hold at most 32767; the portable kernel's int8 counts stop at
  // 127. One limit for both fused paths, so that D > 127 takes the cuFFT path whatever is forced.
  if (grads.size(0) > kMaxFusedDomains)
    return "D = " + std::to_string(grads.size(0)) + " > " + std::to_string(kMaxFusedDomains) +
           " domains takes the cuFFT path";
  if (!dx::applies(H, W, dx_in_type(t), grads.get_device()))
    return std::to_string(H) + "x" + std::to_string(W) +
           " is not an instantiated size, or the device is not sm_90 or cannot hold its CTAs (instantiated: " +
           dx::describe() + ")";
  if (reinterpret_cast<uintptr_t>(grads.const_data_ptr()) % 16 != 0) return "input not 16-byte aligned";
  if ((grads.size(1) * grads.size(2) + 1) > static_cast<int64_t>(INT32_MAX)) return "too many planes";
  return "";
#else
  (void)grads;
  (void)what;
  return "this build has no cuFFTDx kernel (nvidia-mathdx was not installed when it was compiled)";
#endif
}

// The path this call takes (raises when a forced path cannot take it). plan: the portable plan,
// computed when that path is a candidate.
template <typename scalar_t, typename T>
Path choose_path(const at::Tensor& grads, Outputs what, FusedPlan& plan) {
  const Path want = static_cast<Path>(options().path.load());
  const int64_t D = grads.size(0), planes = grads.size(1) * grads.size(2);
  const int H = static_cast<int>(grads.size(3)), W = static_cast<int>(grads.size(4));
  TORCH_CHECK(want == Path::kAuto || !path_disabled(grads, want), "sgs::surgery (CUDA): SGS_CUDA_PATH=",
              path_name(want), " but the self-check disabled that path for ", H, "x", W, " D=", D, " ",
              grads.scalar_type(), " in this process (see the warning it gave)");
  // The first call of a size sets kernel attributes and queries occupancy (cached per device).
  // Inside a CUDA graph capture in the default (global) mode such calls are not allowed; they are
  // host-side set-up, not stream work, so they run with the thread's capture mode relaxed.
  const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
  if (want == Path::kAuto || want == Path::kDx) {
    const std::string why = dx_refusal(grads, what);
    TORCH_CHECK(want != Path::kDx || why.empty(), "sgs::surgery (CUDA): SGS_CUDA_PATH=dx but ", why);
    if (why.empty() && !path_disabled(grads, Path::kDx)) return Path::kDx;
  }
  if (want != Path::kCufft && (want == Path::kPortable || !path_disabled(grads, Path::kPortable)))
    plan = device_plan<scalar_t, T>(H, W, D, planes, grads.get_device());
  TORCH_CHECK(want != Path::kPortable || plan.ok, "sgs::surgery (CUDA): SGS_CUDA_PATH=portable but a ", H, "x", W,
              " plane with D=", D, " cannot take the portable kernel on this device");
  return plan.ok ? Path::kPortable : Path::kCufft;
}

}  // namespace
}  // namespace cuda_detail

std::vector<at::Tensor> surgery_cuda_impl(const at::Tensor& grads_in, const at::Tensor& assign_in, double tau,
                                          double rho, double alpha, double beta, bool soft, Outputs what) {
  using namespace cuda_detail;
  TORCH_CHECK(grads_in.is_cuda(), "sgs::surgery (CUDA): grads must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(grads_in.device());
  const at::Tensor grads = aligned_contiguous(grads_in);
  const at::Tensor assign = assign_in.to(grads.device(), at::kLong).contiguous();
  check_assign_range(assign, grads.size(0));
  SurgeryOutputs outs(grads, what);
  const bool parts = outs.parts(), sums = outs.with_stats();
  at::Tensor &update = outs.update, &mean = outs.mean, &shared = outs.shared, &diversity = outs.diversity,
             &stats = outs.stats;
  if (grads.numel() == 0) return outs.list();
  const int64_t D = grads.size(0), N = grads.size(1), C = grads.size(2);
  const int H = static_cast<int>(grads.size(3)), W = static_cast<int>(grads.size(4));
  const int64_t planes = N * C;
  const int device = grads.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads.scalar_type(), "sgs_surgery_cuda", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const SurgeryParams<T> p = make_params<T>(static_cast<int>(D), tau, rho, alpha, beta, soft);
    FusedPlan plan{};
    const Path path = choose_path<scalar_t, T>(grads, what, plan);
    if (path == Path::kDx) {
#if defined(SGS_WITH_DX)
      dx::Call c;  // (float64 never gets here: dx_refusal)
      c.grads = grads.const_data_ptr();
      c.in_type = dx_in_type(grads.scalar_type());
      c.assign = assign.const_data_ptr<int64_t>();
      c.update = update.data_ptr();
      c.stats = sums ? stats.data_ptr<double>() : nullptr;  // zeroed by SurgeryOutputs; one atomicAdd per CTA
      c.planes = planes;
      c.channels = C;
      c.domains = static_cast<int>(D);
      c.p = make_params<float>(static_cast<int>(D), tau, rho, alpha, beta, soft);
      c.stream = stream;
      c.device = device;
      dx::run(H, W, c);
#endif
    } else if (path == Path::kPortable) {
      at::Tensor plane_stats;
      if (sums) plane_stats = at::empty({planes * plan.cs, 4}, grads.options().dtype(at::kDouble));
      FusedArgs<scalar_t, T> args;
      args.grads = grads.const_data_ptr<scalar_t>();
      args.assign = assign.const_data_ptr<int64_t>();
      args.update = update.data_ptr<scalar_t>();
      args.shared = parts ? shared.data_ptr<scalar_t>() : nullptr;
      args.diversity = parts ? diversity.data_ptr<scalar_t>() : nullptr;
      args.plane_stats = sums ? plane_stats.data_ptr<double>() : nullptr;
      args.planes = planes;
      args.channels = C;
      args.domains = static_cast<int>(D);
      args.parts = parts;
      args.sums = sums;
      args.p = p;
      args.plan = plan;
      args.rows = make_plan(plan.M);
      args.cols = make_plan(plan.H);
      launch_fused(args, stream, device);
      if (sums) stats.copy_(plane_stats.sum(0));
    } else {
      run_fallback<T>(grads, assign, p, outs);
    }
    if (parts) {
      const at::ScalarType ct = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
      mean.copy_(grads.to(ct).mean(0));
    }
  });
  return outs.list();
}

namespace {

// sgs::cuda_path(grads, parts): which path such a call takes now ("dx", "portable", "cufft").
std::string cuda_path(const at::Tensor& grads, bool parts) {
  using namespace cuda_detail;
  TORCH_CHECK(grads.is_cuda() && grads.dim() == 5, "sgs::cuda_path: grads must be a 5-d CUDA tensor");
  const c10::cuda::CUDAGuard guard(grads.device());
  std::string name;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads.scalar_type(), "sgs_cuda_path", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    FusedPlan plan{};
    name = path_name(choose_path<scalar_t, T>(aligned_contiguous(grads), parts ? Outputs::kParts : Outputs::kUpdate,
                                              plan));
  });
  return name;
}

// sgs::cuda_build_info(): the paths this build has, in one line (no GPU needed).
std::string cuda_build_info() {
#if defined(SGS_WITH_DX)
  return "dx: " + dx::describe() + "; portable; cufft";
#else
  return "dx: not built; portable; cufft";
#endif
}

// sgs::set_cuda_options(path, smem_limit): "" keeps the path, smem_limit -1 restores the device's.
void set_cuda_options(c10::string_view path, int64_t smem_limit) {
  using namespace cuda_detail;
  if (!path.empty()) options().path = static_cast<int>(parse_path(std::string(path).c_str()));
  options().smem_limit = smem_limit;
}

// sgs::disable_cuda_path(device, H, W, D, dtype, path): the self-check found `path` wrong there;
// path "" clears the whole table (tests).
void disable_cuda_path(int64_t device, int64_t H, int64_t W, int64_t D, at::ScalarType dtype, c10::string_view path) {
  using namespace cuda_detail;
  std::lock_guard<std::mutex> lock(disabled_mutex());
  if (path.empty()) {
    disabled_paths().clear();
    return;
  }
  const Path p = parse_path(std::string(path).c_str());
  TORCH_CHECK(p != Path::kAuto, "sgs::disable_cuda_path: name a path (dx, portable, cufft)");
  disabled_paths().push_back({static_cast<int>(device), static_cast<int>(H), static_cast<int>(W), D,
                              static_cast<int>(dtype), static_cast<int>(p)});
}

std::string get_cuda_path_option() { return cuda_detail::path_name(static_cast<cuda_detail::Path>(cuda_detail::options().path.load())); }

}  // namespace
}  // namespace sgs

TORCH_LIBRARY_FRAGMENT(sgs, m) {
  m.def("cuda_path(Tensor grads, bool parts) -> str", &sgs::cuda_path);
  m.def("cuda_build_info() -> str", &sgs::cuda_build_info);
  m.def("set_cuda_options(str path, int smem_limit) -> ()", &sgs::set_cuda_options);
  m.def("cuda_path_option() -> str", &sgs::get_cuda_path_option);
  m.def("disable_cuda_path(int device, int H, int W, int D, ScalarType dtype, str path) -> ()", &sgs::disable_cuda_path);
}

#endif  // !SGS_EMULATE
