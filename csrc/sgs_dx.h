// The block algorithm of the cuFFTDx kernel (csrc/sgs_cuda_dx*.cu), without cuFFTDx or torch.
//
// One CTA of X x F threads (x = threadIdx.x, y = threadIdx.y: cuFFTDx's block layout, where the
// FFT with id y is spread over the X threads of row y, thread x holding elements x + i*X) does
// P (image, channel) planes of H x W, W even, M = W/2, Wr = M + 1:
//
//   for each step s (domain order per plane: the others ascending, the assigned domain last):
//     the D-th plane group of step s+1 is already on its way into the other staging buffer
//     (cp.async, double-buffered), so the loads overlap the transforms of step s;
//     row pass, in rounds of F rows: packed pairs z[j] = x[2j] + i x[2j+1] of a row from the
//       staging buffer into registers, length-M complex FFT, Z[h][j] into the exchange buffer;
//     column pass, F = P*Wr columns at once, one column per FFT id: real_unpack (sgs_math.h) of
//       Z[h][k], Z[h][M-k] gives the row spectrum X[h][k] in registers, length-H complex FFT,
//       then the bins' statistics (stats_first/stats_add) stay in the same thread's registers
//       for the whole domain loop; at the last (assigned) step recombine_bin turns each bin
//       into the update spectrum in place;
//   inverse: column iFFT, exchange buffer, real_pack_inverse, row iFFT, one vectorised store.
//
// Every thread owns the same Ec bins for the whole plane group, so the statistics never touch
// shared memory. Global memory traffic is the floor: D reads and one write of each plane.
//
// The FFTs and the data movement that needs a device (cp.async, barriers) are the context's:
// csrc/sgs_cuda_dx.cu runs this with cuFFTDx block FFTs, tests/test_dx_emulated.py on the host
// with one ThreadState per thread and a reference DFT in the same register layout, so every
// index, the exchange, the statistics, the mask and the recombination are checked without a GPU.
#pragma once

#include <cstdint>
#include <cstring>

#include "sgs_math.h"

#if defined(__CUDACC__)
#define SGS_DX_HD __host__ __device__ __forceinline__
#define SGS_DX_UNROLL _Pragma("unroll")
#else
#define SGS_DX_HD inline
#define SGS_DX_UNROLL
#endif

namespace sgs {
namespace dx {

// Compile-time shape of one instantiation. X threads per FFT; the row FFT (length M) then has
// Er = M/X elements per thread and the column FFT (length H) Ec = H/X, so both FFT descriptors
// have the same block dimensions (X, F), as cuFFTDx's block execution requires.
template <int H_, int W_, int X_, int P_>
struct Shape {
  static constexpr int H = H_, W = W_, M = W_ / 2, Wr = W_ / 2 + 1, X = X_, P = P_;
  static constexpr int Er = M / X, Ec = H / X;
  static constexpr int F = P * Wr;       // FFT ids: one per (plane, half-spectrum column)
  static constexpr int threads = X * F;
  static constexpr int rounds = (P * H + F - 1) / F;  // row-pass rounds (the last may be ragged)
  static constexpr int zs = Wr;          // complex row stride of the exchange buffer (odd: banks)
  static_assert(W % 2 == 0 && M % X == 0 && H % X == 0, "X must divide W/2 and H");
  static_assert((H * W) % 8 == 0, "planes must be whole 16-byte chunks for cp.async");
};

// The sizes the CUDA build instantiates (sgs_cuda_dx_*.cu). X follows cuFFTDx's sm_90 float32
// database: lengths 16, 32, 64 have implementations with 2 to 16 threads per FFT, lengths 14 and
// 28 (factor 7) only with one thread per FFT. P keeps a CTA at 120-272 threads. Other sizes take
// the portable kernel. A new size needs an entry here and an entry in SGS_DX_SIZES (sgs_dx_api.h).
template <int H, int W>
struct Config;
template <>
struct Config<28, 28> {
  using S = Shape<28, 28, 1, 8>;  // 120 threads; the 28 bins of a column live in one thread
};
template <>
struct Config<32, 32> {
  using S = Shape<32, 32, 4, 2>;  // 136 threads: rows 4 x 4 elements, columns 4 x 8
};
template <>
struct Config<64, 64> {
  using S = Shape<64, 64, 8, 1>;  // 264 threads: rows 8 x 4, columns 8 x 8
};
template <>
struct Config<32, 64> {
  using S = Shape<32, 64, 8, 1>;  // 264 threads: rows 8 x 4, columns 8 x 4
};
template <>
struct Config<64, 32> {
  using S = Shape<64, 32, 8, 2>;  // 272 threads: rows 8 x 2, columns 8 x 8
};

// A complex float with the size and alignment of float2 and cufftdx::complex<float>.
struct alignas(8) Cplx {
  float x, y;
};

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
  int64_t planes, channels;
  int domains;
  SurgeryParams<float> p;
};

// Byte offsets of the shared-memory regions: two staging buffers (P planes of the input type),
// the exchange buffer [P][H][zs] complex, and the FFT library's workspace.
struct Layout {
  int64_t stage[2], exchange, workspace, total;
};

inline constexpr int64_t align16(int64_t x) { return (x + 15) & ~static_cast<int64_t>(15); }

template <class S>
SGS_DX_HD Layout layout(int in_bytes, int64_t workspace_bytes) {
  Layout L{};
  const int64_t stage = align16(static_cast<int64_t>(S::P) * S::H * S::W * in_bytes);
  L.stage[0] = 0;
  L.stage[1] = stage;
  L.exchange = 2 * stage;
  L.workspace = L.exchange + align16(static_cast<int64_t>(S::P) * S::H * S::zs * sizeof(Cplx));
  L.total = L.workspace + align16(workspace_bytes);
  return L;
}

// What one thread keeps in registers: its row-pass elements, its column's Ec bins and their
// statistics, and the unpack twiddle of its column.
template <class S>
struct ThreadState {
  int x, y;
  Cplx row[S::Er];
  Cplx col[S::Ec];
  BinStats<float> st[S::Ec];
  Cplx w_col;
};

// FFT tags for the context.
struct RowFwd {};
struct RowInv {};
struct ColFwd {};
struct ColInv {};

// Domain of step s for an image assigned domain ad: the others ascending, ad last.
SGS_DX_HD int domain_at(int s, int D, int ad) { return s == D - 1 ? ad : (s < ad ? s : s + 1); }

// Plane group `group` (planes [group*P, group*P + P)). The context supplies each(f) (f on every
// thread's state), sync() (block barrier), fft(tag, get) (a collective FFT of get(state) over
// all threads), stage_copy(dst, src, bytes) (asynchronous 16-byte-chunked copy by the whole
// block), stage_commit() and stage_wait(pending) (wait until at most `pending` copy groups are
// in flight).
template <class S, typename In, class Ctx>
SGS_DX_HD void plane_group(Ctx& ctx, const Args<In>& a, unsigned char* smem, const Layout& L, int64_t group) {
  using State = ThreadState<S>;
  constexpr int H = S::H, W = S::W, M = S::M, Wr = S::Wr, X = S::X, F = S::F, P = S::P;
  const int64_t plane0 = group * P;
  const int np = static_cast<int>(a.planes - plane0 < P ? a.planes - plane0 : P);
  const int D = a.domains;
  const int64_t plane_elems = static_cast<int64_t>(H) * W;
  In* const stage[2] = {reinterpret_cast<In*>(smem + L.stage[0]), reinterpret_cast<In*>(smem + L.stage[1])};
  Cplx* const zb = reinterpret_cast<Cplx*>(smem + L.exchange);

  auto assigned = [&](int p) {  // the assigned domain of plane p of the group, clamped
    const int64_t v = a.assign[(plane0 + p) / a.channels];
    return static_cast<int>(v < 0 ? 0 : (v >= D ? D - 1 : v));
  };
  auto issue = [&](int s) {  // the planes of step s into staging buffer s % 2
    for (int p = 0; p < np; ++p) {
      const In* src = a.grads + (static_cast<int64_t>(domain_at(s, D, assigned(p))) * a.planes + plane0 + p) * plane_elems;
      ctx.stage_copy(stage[s & 1] + p * plane_elems, src, plane_elems * static_cast<int64_t>(sizeof(In)));
    }
    ctx.stage_commit();
  };

  ctx.each([&](State& t) {
    const int k = t.y % Wr;
    t.w_col = twiddle_f(k, W);
  });
  issue(0);
  for (int s = 0; s < D; ++s) {
    if (s + 1 < D) {
      issue(s + 1);  // its buffer was last read by the row pass of step s - 1, before a barrier
      ctx.stage_wait(1);
    } else {
      ctx.stage_wait(0);
    }
    ctx.sync();  // step s staged for everyone; the exchange buffer is free again
    const In* const st = stage[s & 1];
    for (int r = 0; r < S::rounds; ++r) {
      ctx.each([&](State& t) {
        const int g = r * F + t.y, p = g / H, h = g - p * H;
        const bool valid = p < np;
        SGS_DX_UNROLL for (int i = 0; i < S::Er; ++i) {
          const int j = t.x + i * X;
          t.row[i] = valid ? Io<In>::load2(st + (static_cast<int64_t>(p) * H + h) * W + 2 * j) : Cplx{0.f, 0.f};
        }
      });
      ctx.fft(RowFwd{}, [](State& t) { return t.row; });
      ctx.each([&](State& t) {
        const int g = r * F + t.y, p = g / H, h = g - p * H;
        if (p < P) {
          SGS_DX_UNROLL for (int i = 0; i < S::Er; ++i) zb[(p * H + h) * S::zs + t.x + i * X] = t.row[i];
        }
      });
    }
    ctx.sync();
    const bool last = s == D - 1;
    ctx.each([&](State& t) {
      const int p = t.y / Wr, k = t.y - p * Wr;
      SGS_DX_UNROLL for (int i = 0; i < S::Ec; ++i) {
        const Cplx* zrow = zb + (p * H + t.x + i * X) * S::zs;
        const Cplx zk = zrow[k % M], zc = zrow[(M - k) % M];
        real_unpack(zk.x, zk.y, zc.x, zc.y, t.w_col.x, t.w_col.y, t.col[i].x, t.col[i].y);
      }
    });
    ctx.fft(ColFwd{}, [](State& t) { return t.col; });
    ctx.each([&](State& t) {
      const int k = t.y % Wr;
      SGS_DX_UNROLL for (int i = 0; i < S::Ec; ++i) {
        const int h = t.x + i * X;
        const float re = t.col[i].x;
        // Self-conjugate bins are real for real input: drop the rounding noise of Im, as the CPU does.
        const float im = ((h == 0 || (H % 2 == 0 && h == H / 2)) && (k == 0 || k == M)) ? 0.f : t.col[i].y;
        if (s == 0)
          stats_first(t.st[i], re, im);
        else
          stats_add(t.st[i], re, im);
        if (last) {  // this step's spectrum is the assigned domain's Fa
          const BinResult<float> b = recombine_bin(a.p, t.st[i], re, im);
          t.col[i] = Cplx{b.upd_re, b.upd_im};
        }
      }
    });
  }

  // Inverse: columns, exchange, rows.
  ctx.fft(ColInv{}, [](State& t) { return t.col; });
  ctx.sync();  // the last column pass has read the exchange buffer
  ctx.each([&](State& t) {
    const int p = t.y / Wr, k = t.y - p * Wr;
    SGS_DX_UNROLL for (int i = 0; i < S::Ec; ++i) zb[(p * H + t.x + i * X) * S::zs + k] = t.col[i];
  });
  ctx.sync();
  const float scale = 1.0f / static_cast<float>(H * M);
  for (int r = 0; r < S::rounds; ++r) {
    ctx.each([&](State& t) {
      const int g = r * F + t.y, p = g / H, h = g - p * H;
      SGS_DX_UNROLL for (int i = 0; i < S::Er; ++i) {
        const int j = t.x + i * X;
        t.row[i] = Cplx{0.f, 0.f};
        if (p < P) {
          const Cplx* xrow = zb + (p * H + h) * S::zs;
          const Cplx w = twiddle_f(j, W);
          real_pack_inverse(j, xrow[j].x, xrow[j].y, xrow[M - j].x, xrow[M - j].y, w.x, w.y, t.row[i].x, t.row[i].y);
        }
      }
    });
    ctx.fft(RowInv{}, [](State& t) { return t.row; });
    ctx.each([&](State& t) {
      const int g = r * F + t.y, p = g / H, h = g - p * H;
      if (p < np) {
        In* const out = a.update + (plane0 + p) * plane_elems + static_cast<int64_t>(h) * W;
        SGS_DX_UNROLL for (int i = 0; i < S::Er; ++i)
          Io<In>::store2(out + 2 * (t.x + i * X), t.row[i].x * scale, t.row[i].y * scale);
      }
    });
  }
}

}  // namespace dx
}  // namespace sgs
