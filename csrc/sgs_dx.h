// The block algorithm of the cuFFTDx kernel (csrc/sgs_cuda_dx*.cu), without cuFFTDx or torch.
//
// A cluster of CS CTAs (CS = 1: a plain CTA) of X x F threads (x = threadIdx.x, y = threadIdx.y;
// the FFT with id y is spread over the X threads of row y) does P (image, channel) planes of
// H x W at a time (W even, M = W/2, Wr = M + 1 half-spectrum columns), and loops over plane groups
// (a persistent grid: the first domain of the next group is fetched while the last one of this
// group is transformed). CTA r of a cluster runs the row FFTs of rows [r*Hc, r*Hc + Hc) and owns
// the column FFTs [r*Fc, r*Fc + Fc) (Hc = H/CS, Fc = M/CS): the statistics of their bins live in
// its threads' registers. CS = 1 for every size but 128x128 (see Config<128, 128>).
//
// M column FFTs for Wr columns: columns 0 and M of the half spectrum are real along H (sums of a
// row with weights 1 and (-1)^w), so column FFT 0 transforms X[h][0] + i X[h][M] and splits the
// result by Hermitian symmetry (F0[v] = (C[v] + conj C[H-v])/2, FM[v] = (C[v] - conj C[H-v])/2i,
// a mirror exchange between the threads holding v and H-v). Its registers hold F0[v] for
// 0 < v < H/2, FM[H-v] for v > H/2 (each standing for itself and its mirror, which has the same
// mask: it counts twice in the diagnostic sums) and, at v = 0 and H/2, the two real bins F0[v],
// FM[v] as one (re, im) pair. So CTAs are whole warps (128x128: 2 x 512 threads, not 528) and a
// column FFT is saved.
//
//   for each step s (domain order per plane: the others ascending, the assigned domain last):
//     the plane group of the next step is already on its way into the other staging buffer
//     (cp.async, double-buffered), so the loads overlap the transforms of this step;
//     row pass, in rounds of F rows: packed pairs z[j] = x[2j] + i x[2j+1] of a row from the
//       staging buffer into registers, length-M complex FFT, Z[h][j] into the exchange buffer zb;
//     CS = 1: column pass, one column per FFT id: real_unpack (sgs_math.h) of Z[h][k], Z[h][M-k]
//       gives the row spectrum X[h][k] in registers (column 0: X[h][0] + i X[h][M] from Z[h][0]);
//     CS > 1: unpack pass: each CTA unpacks its own rows and stores X[h][k] into the column
//       buffer xb of the CTA that owns column k (distributed shared memory, xb double-buffered so
//       that one cluster barrier per step suffices), then the column pass reads its xb;
//     length-H complex FFT of each column (column 0: the mirror split), then the bins' statistics
//       (stats_first/stats_add) stay in the same thread's registers for the whole domain loop; at
//       the last (assigned) step recombine_bin turns each bin into the update spectrum in place
//       (and, when asked, adds the bin to the diagnostic sums);
//   inverse: column 0 merged back (mirror exchange), column iFFT, X[h][k] into the exchange buffer
//     of the CTA that owns row h, real_pack_inverse, row iFFT, one vectorised store.
//
// Two kinds of FFT (Shape::kind): kBlock, a cuFFTDx block FFT (thread x of FFT y holds elements
// x + i*X in and out); kSplit, for lengths that cuFFTDx implements with one thread only (14, 28):
// each of X = 2^s threads runs a cuFFTDx thread FFT of length E = N/X on its elements x + i*X,
// then s radix-2 stages across the threads with warp shuffles (split_fft below). Its output is in
// another order (thread x holds element bitrev(x)*E + k at k, out_index), which only the index
// arithmetic sees: the inverse takes the same layout back.
//
// Every thread owns the same Ec bins for the whole plane group, so the statistics never touch
// shared memory. Global memory traffic is the floor: D reads and one write of each plane.
//
// The FFTs, the shuffles and the data movement that needs a device (cp.async, barriers, cluster
// barriers and distributed shared memory, the diagnostic sums' reduction) are the context's:
// csrc/sgs_cuda_dx.cuh runs this with cuFFTDx, tests/test_dx_emulated.py on the host with one
// ThreadState per thread, one std::thread per CTA of a cluster, deferred staging copies and a
// reference DFT in the same register layout, so every index, the exchanges, the split FFT's
// stages, the column packing, the statistics, the mask and the recombination are checked
// without a GPU.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "sgs_math.h"

// Device asserts as the portable kernel's (CUDA_KERNEL_ASSERT where torch's macros are included),
// assert() on the host (the emulation).
#if defined(__CUDA_ARCH__) && defined(CUDA_KERNEL_ASSERT)
#define SGS_DX_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)
#else
#include <cassert>
#define SGS_DX_ASSERT(cond) assert(cond)
#endif

#if defined(__CUDACC__)
#define SGS_DX_HD __host__ __device__ __forceinline__
#define SGS_DX_UNROLL _Pragma("unroll")
#else
#define SGS_DX_HD inline
#define SGS_DX_UNROLL
#endif

namespace sgs {
namespace dx {

enum class Fft { kBlock, kSplit };

constexpr bool power_of_two(int n) { return n > 0 && (n & (n - 1)) == 0; }

// Compile-time shape of one instantiation. X threads per FFT; the row FFT (length M) then has
// Er = M/X elements per thread and the column FFT (length H) Ec = H/X, so both FFT descriptors
// have the same block dimensions (X, F), as cuFFTDx's block execution requires. F = P*Fc FFT ids:
// id y is column k_lo + y % Fc of plane y / Fc (column 0: the packed columns 0 and M).
template <int H_, int W_, int X_, int P_, int CS_ = 1, Fft K_ = Fft::kBlock, int B_ = 1>
struct Shape {
  static constexpr int H = H_, W = W_, M = W_ / 2, Wr = W_ / 2 + 1, X = X_, P = P_, CS = CS_;
  static constexpr Fft kind = K_;
  static constexpr int Hc = H / CS;              // rows whose row FFTs one CTA runs
  static constexpr int Fc = M / CS;  // column FFTs one CTA owns
  static constexpr int Er = M / X, Ec = H / X;
  static constexpr int F = P * Fc;  // FFT ids: one per (plane, owned column FFT)
  static constexpr int threads = X * F;
  static constexpr int warps = (threads + 31) / 32;
  // CTAs per SM the registers must allow (__launch_bounds__ minimum blocks): caps ptxas's register
  // count at 65536 / (B * threads) (no effect on the algorithm).
  static constexpr int min_ctas = B_;
  static constexpr int rounds = (P * Hc + F - 1) / F;  // row-pass rounds (the last may be ragged)
  static constexpr int zs = Wr;  // complex row stride of the exchange buffer (odd when M is even: banks)
  static constexpr int xs = Fc % 2 ? Fc : Fc + 1;  // complex row stride of the column buffers (CS > 1; odd)
  static_assert(W % 2 == 0 && M % X == 0 && H % X == 0, "X must divide W/2 and H");
  static_assert((Hc * W) % 8 == 0, "a CTA's rows must be whole 16-byte chunks for cp.async");
  static_assert(CS == 1 || (P == 1 && H % CS == 0 && M % CS == 0), "a cluster does one plane, split by rows");
  static_assert(kind == Fft::kBlock || (power_of_two(X) && X <= 32), "split FFTs: 2^s threads of one warp");
  static_assert(threads <= 1024, "at most 1024 threads per CTA");
};

// The sizes the CUDA build instantiates (sgs_cuda_dx_*.cu). X follows cuFFTDx's sm_90 float32
// database (lengths 16, 32, 64, 128 have block implementations with 2 to 32 threads per FFT;
// 7, 14 and 28 only thread implementations). A CTA keeps 2-8 bins (up to 14 at 28x28) per thread.
// Other sizes take the portable kernel. A new size needs an entry here, an entry in SGS_DX_SIZES
// (sgs_dx_api.h) and an instantiation in a sgs_cuda_dx_<n>.cu file.
template <int H, int W>
struct Config;
template <>
struct Config<28, 28> {
  // Split FFTs over 2 threads (rows 7 + 7, columns 14 + 14 elements): 14 bins per thread. The
  // cuFFTDx block FFT of length 28 has one thread per FFT, so a thread held 28 bins and spilled.
  // 112 threads; asking for 2 CTAs per SM matters: with 1, ptxas took 168 registers and spilled.
  using S = Shape<28, 28, 2, 4, 1, Fft::kSplit, 2>;
};
template <>
struct Config<32, 32> {
  using S = Shape<32, 32, 4, 2, 1, Fft::kBlock, 4>;  // 128 threads: rows 4 x 4 elements, columns 4 x 8
};
template <>
struct Config<64, 64> {
  using S = Shape<64, 64, 8, 1, 1, Fft::kBlock, 2>;  // 256 threads: rows 8 x 4, columns 8 x 8
};
template <>
struct Config<32, 64> {
  using S = Shape<32, 64, 8, 1, 1, Fft::kBlock, 2>;  // 256 threads: rows 8 x 4, columns 8 x 4
};
template <>
struct Config<64, 32> {
  using S = Shape<64, 32, 8, 2, 1, Fft::kBlock, 2>;  // 256 threads: rows 8 x 2, columns 8 x 8
};
template <>
struct Config<64, 128> {
  using S = Shape<64, 128, 8, 1>;  // 512 threads: rows 8 x 8, columns 8 x 8
};
template <>
struct Config<128, 64> {
  using S = Shape<128, 64, 16, 1>;  // 512 threads: rows 16 x 2, columns 16 x 8
};
template <>
struct Config<128, 128> {
  // 8320 bins: at 7 registers per bin (its value and statistics) more than one SM's 65536
  // registers once the FFTs' own are counted. A cluster of 2 CTAs on 2 SMs splits the column
  // FFTs (32 + 32) and the row FFTs (64 + 64 rows); after the row FFTs each CTA sends the unpacked
  // spectrum of its rows to the column owner (distributed shared memory), and the inverse sends
  // the columns back to the row owners. 2 x 512 threads, 8 bins per thread, as 128x64.
  using S = Shape<128, 128, 16, 1, 2>;
};

// A complex float with the size and alignment of float2 and cufftdx::complex<float>.
struct alignas(8) Cplx {
  float x, y;
};

SGS_DX_HD Cplx cmul(Cplx a, Cplx b) { return Cplx{a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x}; }
SGS_DX_HD Cplx cmul_conj(Cplx a, Cplx b) { return Cplx{a.x * b.x + a.y * b.y, a.y * b.x - a.x * b.y}; }  // a * conj(b)
SGS_DX_HD Cplx cadd(Cplx a, Cplx b) { return Cplx{a.x + b.x, a.y + b.y}; }
SGS_DX_HD Cplx csub(Cplx a, Cplx b) { return Cplx{a.x - b.x, a.y - b.y}; }

// Loads and stores of an input-type pair (x[2j], x[2j+1]); the half-precision specialisations
// live in the CUDA source.
template <typename In>
struct Io;

template <>
struct Io<float> {
  static SGS_DX_HD Cplx load2(const float* p) {
#if defined(__CUDA_ARCH__)
    const float2 v = *reinterpret_cast<const float2*>(p);
    return Cplx{v.x, v.y};
#else
    return Cplx{p[0], p[1]};
#endif
  }
  static SGS_DX_HD void store2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__)
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
#else
    p[0] = a;
    p[1] = b;
#endif
  }
};

// exp(-2 pi i k / n) in float; on the device with sincospif (a few ulp, no double precision).
SGS_DX_HD Cplx twiddle_f(int k, int n) {
#if defined(__CUDA_ARCH__)
  float s, c;
  sincospif(-2.0f * static_cast<float>(k) / static_cast<float>(n), &s, &c);
  return Cplx{c, s};
#else
  double re, im;
  twiddle(k, n, re, im);
  return Cplx{static_cast<float>(re), static_cast<float>(im)};
#endif
}

template <typename In>
struct Args {
  const In* grads;        // [D, planes, H, W]
  const int64_t* assign;  // [N]
  In* update;             // [planes, H, W]
  double* stats;          // [4] diagnostic sums to add to (zeroed by the caller), or null
  int64_t planes, channels;
  int domains;
  SurgeryParams<float> p;
};

// Byte offsets of the shared-memory regions: two staging buffers (P planes of Hc rows of the
// input type), the exchange buffer [P][Hc][zs] complex, two column buffers [H][xs] (CS > 1), the
// twiddle tables (length M and H for the split FFTs, length Wr for (un)packing), the per-warp
// diagnostic sums, min2/max2 of column M's two real bins per plane, and the FFT library's workspace.
struct Layout {
  int64_t stage[2], exchange, cols[2], twiddles, sums, real_bins, workspace, total;
};

inline constexpr int64_t align16(int64_t x) { return (x + 15) & ~static_cast<int64_t>(15); }

template <class S>
SGS_DX_HD Layout layout(int in_bytes, int64_t workspace_bytes) {
  Layout L{};
  const int64_t stage = align16(static_cast<int64_t>(S::P) * S::Hc * S::W * in_bytes);
  const int64_t cols = S::CS > 1 ? align16(static_cast<int64_t>(S::H) * S::xs * sizeof(Cplx)) : 0;
  L.stage[0] = 0;
  L.stage[1] = stage;
  L.exchange = 2 * stage;
  L.cols[0] = L.exchange + align16(static_cast<int64_t>(S::P) * S::Hc * S::zs * sizeof(Cplx));
  L.cols[1] = L.cols[0] + cols;
  L.twiddles = L.cols[1] + cols;
  L.sums = L.twiddles + align16(static_cast<int64_t>(S::M + S::H + S::Wr) * sizeof(Cplx));
  L.real_bins = L.sums + align16(static_cast<int64_t>(S::warps) * 4 * sizeof(double));
  L.workspace = L.real_bins + align16(static_cast<int64_t>(S::P) * 4 * sizeof(float));
  L.total = L.workspace + align16(workspace_bytes);
  return L;
}

// What one thread keeps in registers: its row-pass elements, its column's Ec bins and their
// statistics, the unpack twiddle of its column, and its share of the diagnostic sums of a plane
// (float partial sums of at most 2*Ec bins, summed in double across threads).
template <class S>
struct ThreadState {
  int x, y;
  Cplx row[S::Er];
  Cplx col[S::Ec];
  PackedBinStats<float> st[S::Ec];
  Cplx w_col;
  float sums[4];
};

// FFT tags for the context: cuFFTDx block FFTs, and the thread FFTs of the split kind.
struct RowFwd {};
struct RowInv {};
struct ColFwd {};
struct ColInv {};
template <int E, bool Inverse>
struct ThreadFft {};

SGS_DX_HD int bit_reverse(int x, int bits) {
  int r = 0;
  for (int b = 0; b < bits; ++b) r |= ((x >> b) & 1) << (bits - 1 - b);
  return r;
}
constexpr int log2_int(int n) { return n <= 1 ? 0 : 1 + log2_int(n / 2); }

// Which element of its length-X*E sequence thread x holds at register i: the input of every
// FFT and the output of the block FFTs x + i*X; the output of a split FFT bitrev(x)*E + i.
template <class S>
SGS_DX_HD int in_index(int x, int i) {
  return x + S::X * i;
}
template <class S, int E>
SGS_DX_HD int out_index(int x, int i) {
  if constexpr (S::kind == Fft::kSplit)
    return bit_reverse(x, log2_int(S::X)) * E + i;
  else
    return x + S::X * i;
}

// The mirror of FFT output register i of thread x, element (N - out_index(x, i)) % N: the thread
// that holds it, and its register, which is also the register thread x must send at step i of a
// mirror exchange (the thread map is an involution at each i and the register depends on x only
// through x == 0, which the map preserves). mirror_value picks it with compile-time indices.
template <class S, int E>
SGS_DX_HD int mirror_thread(int x, int i) {
  if constexpr (S::kind == Fft::kSplit) {
    constexpr int bits = log2_int(S::X);
    const int b = bit_reverse(x, bits);
    return bit_reverse(i == 0 ? (S::X - b) % S::X : S::X - 1 - b, bits);
  } else {
    (void)i;
    return (S::X - x) % S::X;
  }
}
template <class S, int E>
SGS_DX_HD Cplx mirror_value(const Cplx* v, int x, int i) {
  if constexpr (S::kind == Fft::kSplit) {
    (void)x;
    return v[i == 0 ? 0 : E - i];
  } else {
    return x == 0 ? v[(E - i) % E] : v[E - 1 - i];
  }
}

// Whether warp w of CTA `rank` holds the threads of a column FFT 0 (the packed columns): only
// those warps take part in the mirror exchanges. Plane p's column FFT 0 is FFT id p*Fc, threads
// [p*Fc*X, p*Fc*X + X), one warp (X divides 32).
template <class S>
SGS_DX_HD bool warp_holds_packed(int w, int rank) {
  constexpr int per_plane = S::Fc * S::X;
  const int p = (32 * w + per_plane - 1) / per_plane;  // first plane whose column 0 starts in or after w
  return rank == 0 && p < S::P && p * per_plane < 32 * (w + 1);
}

// The split FFT of length N = X*E over the X threads of each FFT id, tw[k] = exp(-2 pi i k/N).
// Forward (decimation in time over the threads): y_x = DFT_E of the thread's elements x + i*X,
// times exp(-2 pi i x k/N), then the X-point DFT across the threads for each k, a radix-2
// network of log2(X) shuffle stages (Gentleman-Sande: the lower thread of a pair keeps u + v,
// the upper (u - v) exp(-2 pi i (x mod m)/(2m))), which leaves X[k + E*q] in thread
// bitrev(q). Inverse: the same steps backwards with conjugate twiddles (Cooley-Tukey network on
// bit-reversed input, twiddle, thread iFFT), from that layout back to elements x + i*X.
// Unnormalised both ways, as cuFFTDx.
template <class S, int E, bool Inverse, class Ctx, class Get>
SGS_DX_HD void split_fft(Ctx& ctx, const Cplx* tw, Get&& get) {
  using State = ThreadState<S>;
  constexpr int X = S::X, N = X * E;
  if constexpr (!Inverse) {
    ctx.fft(ThreadFft<E, false>{}, get);
    if constexpr (X > 1) {
      ctx.each([&](State& t) {
        Cplx* v = get(t);
        SGS_DX_UNROLL for (int k = 1; k < E; ++k) v[k] = cmul(v[k], tw[t.x * k]);
      });
      for (int m = X / 2; m >= 1; m /= 2) {
        const int step = N / (2 * m);
        ctx.template exchange<E>(
            m, get, [](int, Cplx own) { return own; },
            [=](int x, Cplx own, Cplx other) {
              return (x & m) ? cmul(csub(other, own), tw[(x % m) * step]) : cadd(own, other);
            });
      }
    }
  } else {
    if constexpr (X > 1) {
      for (int m = 1; m < X; m *= 2) {
        const int step = N / (2 * m);
        ctx.template exchange<E>(
            m, get, [=](int x, Cplx own) { return (x & m) ? cmul_conj(own, tw[(x % m) * step]) : own; },
            [=](int x, Cplx sent, Cplx other) { return (x & m) ? csub(other, sent) : cadd(sent, other); });
      }
      ctx.each([&](State& t) {
        Cplx* v = get(t);
        SGS_DX_UNROLL for (int k = 1; k < E; ++k) v[k] = cmul_conj(v[k], tw[t.x * k]);
      });
    }
    ctx.fft(ThreadFft<E, true>{}, get);
  }
}

// One of the four transforms of a plane group: the block FFT of the tag, or the split FFT.
template <class S, class Tag, class Ctx, class Get>
SGS_DX_HD void transform(Ctx& ctx, const Cplx* tw_row, const Cplx* tw_col, Get&& get) {
  if constexpr (S::kind == Fft::kBlock) {
    ctx.fft(Tag{}, get);
  } else {
    constexpr bool row = std::is_same_v<Tag, RowFwd> || std::is_same_v<Tag, RowInv>;
    constexpr bool inverse = std::is_same_v<Tag, RowInv> || std::is_same_v<Tag, ColInv>;
    split_fft<S, row ? S::Er : S::Ec, inverse>(ctx, row ? tw_row : tw_col, get);
  }
}

// Domain of step s for an image assigned domain ad: the others ascending, ad last.
SGS_DX_HD int domain_at(int s, int D, int ad) { return s == D - 1 ? ad : (s < ad ? s : s + 1); }

// Everything CTA `rank` of a cluster does: plane groups first, first + stride, ... The context
// supplies each(f) (f on every thread's state), sync() (block barrier), cluster_sync() and
// remote(ptr, rank) (CS > 1: cluster barrier, the same shared-memory object in CTA `rank`),
// fft(tag, get) (a collective FFT of get(state) over all threads: the block FFTs and the thread
// FFTs), exchange<E>(m, get, pre, post) (the split FFT's shuffle stage: every element v of
// get(state) becomes post(x, pre(x, v), pre(x ^ m, v of thread x ^ m))), mirror<E>(get, rank, fn)
// (in the warps that warp_holds_packed: every thread receives mirror_value of thread
// mirror_thread for each register i, then v[i] = fn(state, i, v[i], received)), stage_copy(dst,
// src, bytes) (asynchronous 16-byte-chunked copy by the whole block), stage_commit(),
// stage_wait(n) (wait until at most n copy groups are in flight), sums_add(slots) (add every
// thread's state.sums to the CTA's slots, per warp) and sums_flush(slots, out) (add the slots to
// out[4]).
template <class S, typename In, class Ctx>
SGS_DX_HD void run_cta(Ctx& ctx, const Args<In>& a, unsigned char* smem, const Layout& L, int64_t first,
                       int64_t stride, int rank) {
  using State = ThreadState<S>;
  constexpr int H = S::H, W = S::W, M = S::M, Wr = S::Wr, X = S::X, F = S::F, P = S::P;
  constexpr int CS = S::CS, Hc = S::Hc, Fc = S::Fc;
  const int D = a.domains;
  const int64_t groups = (a.planes + P - 1) / P;
  const int64_t plane_elems = static_cast<int64_t>(H) * W;
  const int h_lo = rank * Hc, k_lo = rank * Fc;  // first own row (row pass), first own column FFT
  // (buffer q of a pair by a select, not an array indexed at run time: that would live in local memory)
  auto stage = [&](int q) { return reinterpret_cast<In*>(smem + (q ? L.stage[1] : L.stage[0])); };
  auto xb = [&](int q) { return reinterpret_cast<Cplx*>(smem + (q ? L.cols[1] : L.cols[0])); };
  Cplx* const zb = reinterpret_cast<Cplx*>(smem + L.exchange);
  Cplx* const tw_row = reinterpret_cast<Cplx*>(smem + L.twiddles);  // exp(-2 pi i k/M), k < M
  Cplx* const tw_col = tw_row + M;                                   // exp(-2 pi i k/H), k < H
  Cplx* const tw_w = tw_col + H;                                     // exp(-2 pi i k/W), k < Wr
  double* const slots = reinterpret_cast<double*>(smem + L.sums);    // [warps][4]
  float* const real_bins = reinterpret_cast<float*>(smem + L.real_bins);  // [P][v = 0, H/2][min2, max2]

  ctx.each([&](State& t) {
    const int tid = t.y * X + t.x;
    for (int i = tid; i < M + H + Wr; i += S::threads)
      tw_row[i] = i < M ? twiddle_f(i, M) : (i < M + H ? twiddle_f(i - M, H) : twiddle_f(i - M - H, W));
    for (int i = tid; i < S::warps * 4; i += S::threads) slots[i] = 0.0;
    t.w_col = twiddle_f(k_lo + t.y % Fc, W);  // (the column of FFT id y; column 0 needs none)
  });
  // CUDA requires a cluster barrier before the first distributed-shared-memory access: only then
  // is every CTA of the cluster known to be running (the first unpack writes into the peer's xb).
  // Here, before the early return, every CTA of the cluster still takes part.
  if constexpr (CS > 1) ctx.cluster_sync();
  if (first >= groups) return;  // the same for every CTA of a cluster

  auto np_of = [&](int64_t group) {
    const int64_t left = a.planes - group * P;
    return static_cast<int>(left < P ? left : P);
  };
  auto issue = [&](int64_t group, int s, int buf) {  // the own rows of step s of `group` into stage(buf)
    for (int p = 0; p < np_of(group); ++p) {
      const int64_t plane = group * P + p;
      const int64_t v = a.assign[plane / a.channels];
      // The host checks the range (sgs::surgery raises); inside CUDA graph capture it cannot, and
      // the kernel asserts as the other paths do. The clamp only keeps the loads in bounds.
      SGS_DX_ASSERT(v >= 0 && v < D);
      const int ad = static_cast<int>(v < 0 ? 0 : (v >= D ? D - 1 : v));
      const In* src = a.grads + (static_cast<int64_t>(domain_at(s, D, ad)) * a.planes + plane) * plane_elems +
                      static_cast<int64_t>(h_lo) * W;
      ctx.stage_copy(stage(buf) + static_cast<int64_t>(p) * Hc * W, src,
                     static_cast<int64_t>(Hc) * W * static_cast<int64_t>(sizeof(In)));
    }
    ctx.stage_commit();
  };
  auto fft = [&](auto tag, auto get) { transform<S, decltype(tag)>(ctx, tw_row, tw_col, get); };
  auto rows = [](State& t) { return t.row; };
  auto cols = [](State& t) { return t.col; };
  // Column FFT 0 (k = 0) carries columns 0 and M: X[h][0] + i X[h][M] from Z[h][0] (real_unpack
  // at k = 0 and k = M, whose imaginary parts vanish).
  auto packed_pair = [](Cplx z0) { return Cplx{z0.x + z0.y, z0.x - z0.y}; };
  auto is_packed = [&](const State& t) { return k_lo + t.y % Fc == 0; };
  auto real_pair = [&](int v) { return v == 0 || (H % 2 == 0 && 2 * v == H); };  // F0[v], FM[v] both real

  int q = 0;  // the staging buffer (and, CS > 1, the column buffer) of the current step
  issue(first, 0, 0);
  for (int64_t group = first; group < groups; group += stride) {
    const int64_t plane0 = group * P;
    const int np = np_of(group);
    for (int s = 0; s < D; ++s, q ^= 1) {
      // The next step's loads into the other buffer, last read by the row pass of the previous
      // step, before a barrier.
      if (s + 1 < D || group + stride < groups) {
        issue(s + 1 < D ? group : group + stride, s + 1 < D ? s + 1 : 0, q ^ 1);
        ctx.stage_wait(1);
      } else {
        ctx.stage_wait(0);
      }
      ctx.sync();  // step s staged for everyone; the exchange buffer is free again
      const In* const st = stage(q);
      for (int r = 0; r < S::rounds; ++r) {
        ctx.each([&](State& t) {
          const int g = r * F + t.y, p = g / Hc, hl = g - p * Hc;
          const bool valid = p < np;
          SGS_DX_UNROLL for (int i = 0; i < S::Er; ++i) {
            const int j = in_index<S>(t.x, i);
            t.row[i] = valid ? Io<In>::load2(st + (static_cast<int64_t>(p) * Hc + hl) * W + 2 * j) : Cplx{0.f, 0.f};
          }
        });
        fft(RowFwd{}, rows);
        ctx.each([&](State& t) {
          const int g = r * F + t.y, p = g / Hc, hl = g - p * Hc;
          if (p < P) {
            SGS_DX_UNROLL for (int i = 0; i < S::Er; ++i) zb[(p * Hc + hl) * S::zs + out_index<S, S::Er>(t.x, i)] = t.row[i];
          }
        });
      }
      ctx.sync();
      if constexpr (CS > 1) {
        // Unpack the own rows; X[h][k] into the column buffer of the CTA that owns column FFT k.
        ctx.each([&](State& t) {
          for (int it = t.y * X + t.x; it < Hc * M; it += S::threads) {
            const int hl = it / M, k = it - hl * M, owner = k / Fc;
            const Cplx* zrow = zb + hl * S::zs;
            Cplx v;
            if (k == 0) {
              v = packed_pair(zrow[0]);
            } else {
              const Cplx zk = zrow[k], zc = zrow[M - k];
              real_unpack(zk.x, zk.y, zc.x, zc.y, tw_w[k].x, tw_w[k].y, v.x, v.y);
            }
            ctx.remote(xb(q), owner)[(h_lo + hl) * S::xs + (k - owner * Fc)] = v;
          }
        });
        ctx.cluster_sync();  // every column buffer complete
      }
      const bool last = s == D - 1;
      ctx.each([&](State& t) {
        const int p = t.y / Fc, kl = t.y - p * Fc, k = k_lo + kl;
        SGS_DX_UNROLL for (int i = 0; i < S::Ec; ++i) {
          const int h = in_index<S>(t.x, i);
          if constexpr (CS == 1) {
            const Cplx* zrow = zb + (p * H + h) * S::zs;
            if (k == 0) {
              t.col[i] = packed_pair(zrow[0]);
            } else {
              const Cplx zk = zrow[k], zc = zrow[M - k];
              real_unpack(zk.x, zk.y, zc.x, zc.y, t.w_col.x, t.w_col.y, t.col[i].x, t.col[i].y);
            }
          } else {
            t.col[i] = xb(q)[h * S::xs + kl];
          }
        }
      });
      fft(ColFwd{}, cols);
      // Column FFT 0: C[v] -> F0[v] = (C[v] + conj C[H-v])/2 (2v < H), FM[H-v] = (C[H-v] - conj C[v])/2i
      // (2v > H); at the real pairs C[v] = F0[v] + i FM[v] already.
      ctx.template mirror<S::Ec>(cols, rank, [&](const State& t, int i, Cplx c, Cplx m) {
        const int v = out_index<S, S::Ec>(t.x, i);
        if (!is_packed(t) || real_pair(v)) return c;
        return 2 * v < H ? Cplx{0.5f * (c.x + m.x), 0.5f * (c.y - m.y)} : Cplx{0.5f * (m.y + c.y), 0.5f * (c.x - m.x)};
      });
      ctx.each([&](State& t) {
        const int p = t.y / Fc;
        const bool packed = is_packed(t), counted = last && a.stats != nullptr && p < np;
        t.sums[0] = t.sums[1] = t.sums[2] = t.sums[3] = 0.f;
        SGS_DX_UNROLL for (int i = 0; i < S::Ec; ++i) {
          const int v = out_index<S, S::Ec>(t.x, i);
          const float re = t.col[i].x, im = t.col[i].y;
          if (packed && real_pair(v)) {
            // Two real bins, F0[v] = re and FM[v] = im: sums and signs in st (as re and im), the
            // magnitudes of FM in shared memory (only this thread touches them).
            float* const mm = real_bins + (p * 2 + (v != 0)) * 2;
            const float r2 = re * re, i2 = im * im;
            if (s == 0) {
              stats_first(t.st[i], re, im);
              t.st[i].min2 = t.st[i].max2 = r2;
              mm[0] = mm[1] = i2;
            } else {
              const float min2 = t.st[i].min2 < r2 ? t.st[i].min2 : r2, max2 = t.st[i].max2 > r2 ? t.st[i].max2 : r2;
              stats_add(t.st[i], re, im);
              t.st[i].min2 = min2, t.st[i].max2 = max2;
              mm[0] = mm[0] < i2 ? mm[0] : i2;
              mm[1] = mm[1] > i2 ? mm[1] : i2;
            }
            if (last) {
              const BinStats<float> u = t.st[i].unpacked();
              const BinResult<float> b0 = recombine_bin(a.p, BinStats<float>{u.sum_re, 0.f, u.min2, u.max2, u.sgn_re, 0}, re, 0.f);
              const BinResult<float> bm = recombine_bin(a.p, BinStats<float>{u.sum_im, 0.f, mm[0], mm[1], u.sgn_im, 0}, im, 0.f);
              t.col[i] = Cplx{b0.upd_re, bm.upd_re};
              if (counted) {
                t.sums[0] += b0.mask_re + b0.mask_im + bm.mask_re + bm.mask_im;
                t.sums[1] += 4.f;
                t.sums[2] += b0.sh_re * b0.sh_re + bm.sh_re * bm.sh_re;
                t.sums[3] += b0.mean_re * b0.mean_re + bm.mean_re * bm.mean_re;
              }
            }
          } else {
            if (s == 0)
              stats_first(t.st[i], re, im);
            else
              stats_add(t.st[i], re, im);
            if (last) {  // this step's spectrum is the assigned domain's Fa
              const BinResult<float> b = recombine_bin(a.p, t.st[i].unpacked(), re, im);
              t.col[i] = Cplx{b.upd_re, b.upd_im};
              if (counted) {  // as sgs_reference counts them: a bin of column 0 or M and its mirror
                const float w = packed ? 2.f : 1.f;
                t.sums[0] += w * (b.mask_re + b.mask_im);
                t.sums[1] += 2.f * w;
                t.sums[2] += w * (b.sh_re * b.sh_re + b.sh_im * b.sh_im);
                t.sums[3] += w * (b.mean_re * b.mean_re + b.mean_im * b.mean_im);
              }
            }
          }
        }
      });
      if (last && a.stats != nullptr) ctx.sums_add(slots);
    }

    // Inverse: column FFT 0 merged back, C[v] = U0[v] + i UM[v] (U0, UM Hermitian: the mirror
    // holds the other half), columns, then each column's values to the exchange buffer of its
    // row's owner (free: every CTA read its exchange buffer before the last step's barrier), rows.
    ctx.template mirror<S::Ec>(cols, rank, [&](const State& t, int i, Cplx c, Cplx m) {
      const int v = out_index<S, S::Ec>(t.x, i);
      if (!is_packed(t) || real_pair(v)) return c;
      return 2 * v < H ? Cplx{c.x - m.y, c.y + m.x} : Cplx{m.x + c.y, c.x - m.y};
    });
    fft(ColInv{}, cols);
    ctx.sync();  // CS = 1: the last column pass has read the exchange buffer
    ctx.each([&](State& t) {
      const int p = t.y / Fc, k = k_lo + t.y - p * Fc;
      SGS_DX_UNROLL for (int i = 0; i < S::Ec; ++i) {
        const int h = in_index<S>(t.x, i), owner = h / Hc;
        Cplx* const xrow = ctx.remote(zb, owner) + (p * Hc + h - owner * Hc) * S::zs;
        if (k == 0) {  // X[h][0] + i X[h][M]
          xrow[0] = Cplx{t.col[i].x, 0.f};
          xrow[M] = Cplx{t.col[i].y, 0.f};
        } else {
          xrow[k] = t.col[i];
        }
      }
    });
    if constexpr (CS > 1)
      ctx.cluster_sync();
    else
      ctx.sync();
    const float scale = 1.0f / static_cast<float>(H * M);
    for (int r = 0; r < S::rounds; ++r) {
      ctx.each([&](State& t) {
        const int g = r * F + t.y, p = g / Hc, hl = g - p * Hc;
        SGS_DX_UNROLL for (int i = 0; i < S::Er; ++i) {
          const int j = out_index<S, S::Er>(t.x, i);
          t.row[i] = Cplx{0.f, 0.f};
          if (p < P) {
            const Cplx* xrow = zb + (p * Hc + hl) * S::zs;
            real_pack_inverse(j, xrow[j].x, xrow[j].y, xrow[M - j].x, xrow[M - j].y, tw_w[j].x, tw_w[j].y, t.row[i].x,
                              t.row[i].y);
          }
        }
      });
      fft(RowInv{}, rows);
      ctx.each([&](State& t) {
        const int g = r * F + t.y, p = g / Hc, hl = g - p * Hc;
        if (p < np) {
          In* const out = a.update + (plane0 + p) * plane_elems + static_cast<int64_t>(h_lo + hl) * W;
          SGS_DX_UNROLL for (int i = 0; i < S::Er; ++i) {
            const int j = in_index<S>(t.x, i);
            Io<In>::store2(out + 2 * j, t.row[i].x * scale, t.row[i].y * scale);
          }
        }
      });
    }
  }
  if (a.stats != nullptr) ctx.sums_flush(slots, a.stats);
}

}  // namespace dx
}  // namespace sgs
