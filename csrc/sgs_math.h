// Per-plane math of Spectral Gradient Surgery, shared by the CPU and the CUDA kernels.
//
// No torch here: plain functions marked SGS_HD (host + device under nvcc). The CPU kernel calls
// them in loops over "lanes" (many independent 1-D transforms side by side, so the inner loop
// vectorises); the CUDA kernel calls the same functions with one lane per thread. Because the
// CPU build runs these on every CI run, the CUDA kernel reuses tested math.
//
// Layout convention: a batch of 1-D transforms of length n stores element e of lane l at
// index e * stride + l (split real/imaginary arrays). The 2-D real FFT of an H x W plane is
//   1. a length-W real FFT of every row (lanes = rows), via one complex FFT of length W/2 when
//      W is even (the packing trick), or a complex FFT of length W when W is odd;
//   2. a transpose into the half-spectrum layout [H][W/2+1];
//   3. a length-H complex FFT of every column (lanes = the W/2+1 columns).
// The inverse runs the same steps backwards. Normalisation follows torch.fft: forward
// unnormalised, inverse scaled by 1/(H*W).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define SGS_HD __host__ __device__ __forceinline__
#define SGS_SIMD
#else
#define SGS_HD inline
#define SGS_SIMD _Pragma("omp simd")
#endif

namespace sgs {

constexpr int kMaxFactors = 32;

// Factorisation of an FFT length into Stockham stages: radix 4 first (fewest passes), then
// 2, 3, 5, then any other prime (handled by the generic O(R^2) butterfly).
struct FftPlan {
  int n;
  int nfactors;
  int factors[kMaxFactors];
};

SGS_HD FftPlan make_plan(int n) {
  FftPlan p;
  p.n = n;
  p.nfactors = 0;
  int rest = n;
  const int small[4] = {4, 2, 3, 5};
  for (int i = 0; i < 4; ++i)
    while (rest > 1 && rest % small[i] == 0) {
      p.factors[p.nfactors++] = small[i];
      rest /= small[i];
    }
  for (int q = 7; rest > 1; q += 2)
    while (rest % q == 0) {
      p.factors[p.nfactors++] = q;
      rest /= q;
    }
  return p;
}

// Twiddle table entry k of length n: exp(-2*pi*i*k/n), computed in double for accuracy.
SGS_HD void twiddle(int k, int n, double& re, double& im) {
  const double angle = -2.0 * 3.14159265358979323846 * static_cast<double>(k) / static_cast<double>(n);
  re = cos(angle);
  im = sin(angle);
}

// One radix-R Stockham stage for butterfly j of a length-n transform, over lanes [l0, l1).
// Ns is the product of the radices of the stages already done. `in` and `out` must differ.
// tw_* is the length-n table exp(-2*pi*i*k/n); the inverse uses its conjugate.
template <typename T>
SGS_HD void fft_stage(int n, int R, int Ns, int j, bool inverse, const T* tw_re, const T* tw_im,
                      const T* __restrict__ in_re, const T* __restrict__ in_im,
                      T* __restrict__ out_re, T* __restrict__ out_im, int stride, int l0, int l1) {
  const int m = n / R;
  const int jm = j % Ns;
  const int step = n / (Ns * R);  // twiddle of input r is table[(r * jm * step) % n]
  const int dst = (j / Ns) * Ns * R + jm;
  const T sgn = inverse ? T(1) : T(-1);  // sign of the exponent
  const T* a_re = in_re + j * stride;
  const T* a_im = in_im + j * stride;
  const int is = m * stride;  // input distance between the R operands
  T* y_re = out_re + dst * stride;
  T* y_im = out_im + dst * stride;
  const int os = Ns * stride;  // output distance between the R results
  if (R == 2) {
    const int k1 = jm * step;
    const T w1r = tw_re[k1], w1i = -sgn * tw_im[k1];
    SGS_SIMD for (int l = l0; l < l1; ++l) {
      const T x0r = a_re[l], x0i = a_im[l];
      const T x1r = a_re[is + l] * w1r - a_im[is + l] * w1i;
      const T x1i = a_re[is + l] * w1i + a_im[is + l] * w1r;
      y_re[l] = x0r + x1r;
      y_im[l] = x0i + x1i;
      y_re[os + l] = x0r - x1r;
      y_im[os + l] = x0i - x1i;
    }
  } else if (R == 4) {
    const int k1 = jm * step, k2 = (2 * k1) % n, k3 = (3 * k1) % n;
    const T w1r = tw_re[k1], w1i = -sgn * tw_im[k1];
    const T w2r = tw_re[k2], w2i = -sgn * tw_im[k2];
    const T w3r = tw_re[k3], w3i = -sgn * tw_im[k3];
    SGS_SIMD for (int l = l0; l < l1; ++l) {
      const T x0r = a_re[l], x0i = a_im[l];
      const T x1r = a_re[is + l] * w1r - a_im[is + l] * w1i;
      const T x1i = a_re[is + l] * w1i + a_im[is + l] * w1r;
      const T x2r = a_re[2 * is + l] * w2r - a_im[2 * is + l] * w2i;
      const T x2i = a_re[2 * is + l] * w2i + a_im[2 * is + l] * w2r;
      const T x3r = a_re[3 * is + l] * w3r - a_im[3 * is + l] * w3i;
      const T x3i = a_re[3 * is + l] * w3i + a_im[3 * is + l] * w3r;
      const T b0r = x0r + x2r, b0i = x0i + x2i, b1r = x0r - x2r, b1i = x0i - x2i;
      const T b2r = x1r + x3r, b2i = x1i + x3i, b3r = x1r - x3r, b3i = x1i - x3i;
      // (x1 - x3) times exp(sgn * i * pi / 2) = sgn * i
      const T r3r = -sgn * b3i, r3i = sgn * b3r;
      y_re[l] = b0r + b2r;
      y_im[l] = b0i + b2i;
      y_re[os + l] = b1r + r3r;
      y_im[os + l] = b1i + r3i;
      y_re[2 * os + l] = b0r - b2r;
      y_im[2 * os + l] = b0i - b2i;
      y_re[3 * os + l] = b1r - r3r;
      y_im[3 * os + l] = b1i - r3i;
    }
  } else if (R == 3) {
    const int k1 = jm * step, k2 = (2 * k1) % n;
    const T w1r = tw_re[k1], w1i = -sgn * tw_im[k1];
    const T w2r = tw_re[k2], w2i = -sgn * tw_im[k2];
    const T c = T(-0.5), s = sgn * T(0.86602540378443864676);
    SGS_SIMD for (int l = l0; l < l1; ++l) {
      const T x0r = a_re[l], x0i = a_im[l];
      const T x1r = a_re[is + l] * w1r - a_im[is + l] * w1i;
      const T x1i = a_re[is + l] * w1i + a_im[is + l] * w1r;
      const T x2r = a_re[2 * is + l] * w2r - a_im[2 * is + l] * w2i;
      const T x2i = a_re[2 * is + l] * w2i + a_im[2 * is + l] * w2r;
      const T tr = x0r + c * (x1r + x2r), ti = x0i + c * (x1i + x2i);
      const T ur = -s * (x1i - x2i), ui = s * (x1r - x2r);  // i * s * (x1 - x2)
      y_re[l] = x0r + x1r + x2r;
      y_im[l] = x0i + x1i + x2i;
      y_re[os + l] = tr + ur;
      y_im[os + l] = ti + ui;
      y_re[2 * os + l] = tr - ur;
      y_im[2 * os + l] = ti - ui;
    }
  } else {  // generic radix: direct R-point DFT, O(R^2) per butterfly
    const int root = n / R;  // table index of exp(-2*pi*i/R)
    for (int k = 0; k < R; ++k) {
      SGS_SIMD for (int l = l0; l < l1; ++l) {
        y_re[k * os + l] = T(0);
        y_im[k * os + l] = T(0);
      }
      for (int r = 0; r < R; ++r) {
        // twiddle_r * root^(r*k), one table entry since both are powers of exp(-2*pi*i/n)
        const int idx = static_cast<int>((static_cast<long long>(r) * jm * step +
                                          static_cast<long long>(r) * k % R * root) % n);
        const T wr = tw_re[idx], wi = -sgn * tw_im[idx];
        SGS_SIMD for (int l = l0; l < l1; ++l) {
          const T xr = a_re[r * is + l], xi = a_im[r * is + l];
          y_re[k * os + l] += xr * wr - xi * wi;
          y_im[k * os + l] += xr * wi + xi * wr;
        }
      }
    }
  }
}

// Real-FFT packing trick, forward: Z is the length-M complex FFT of z[j] = x[2j] + i x[2j+1]
// (M = W/2). Given zk = Z[k % M] and zc = Z[(M - k) % M] and w = exp(-2*pi*i*k/W), returns
// X[k] of the length-W real FFT, for k in [0, M].
template <typename T>
SGS_HD void real_unpack(T zkr, T zki, T zcr, T zci, T wr, T wi, T& xr, T& xi) {
  const T er = T(0.5) * (zkr + zcr), ei = T(0.5) * (zki - zci);  // E = (Zk + conj Zc) / 2
  const T orr = T(0.5) * (zki + zci), oi = T(0.5) * (zcr - zkr);  // O = (Zk - conj Zc) / 2i
  xr = er + wr * orr - wi * oi;
  xi = ei + wr * oi + wi * orr;
}

// Real-FFT packing trick, inverse: from the half-spectrum values xk = X[k], xc = X[M - k] and
// w = exp(-2*pi*i*k/W), returns Z[k] (k in [0, M)) whose inverse length-M FFT is
// x[2j] + i x[2j+1]. The imaginary parts of X[0] and X[M] are ignored, as torch's irfft does.
template <typename T>
SGS_HD void real_pack_inverse(int k, T xkr, T xki, T xcr, T xci, T wr, T wi, T& zr, T& zi) {
  if (k == 0) {
    xki = T(0);
    xci = T(0);
  }
  const T er = T(0.5) * (xkr + xcr), ei = T(0.5) * (xki - xci);  // E = (Xk + conj Xc) / 2
  const T ar = xkr - xcr, ai = xki + xci;                          // Xk - conj Xc
  const T orr = T(0.5) * (ar * wr + ai * wi), oi = T(0.5) * (ai * wr - ar * wi);  // times conj(w)
  zr = er - oi;  // Z = E + i O
  zi = ei + orr;
}

// Signum with sgn(0) = 0, as the spec asks.
template <typename T>
SGS_HD int signum(T x) {
  return (x > T(0)) - (x < T(0));
}

// Single-pass agreement statistics of one spectral bin over the domains.
template <typename T>
struct BinStats {
  T sum_re, sum_im;  // running sum of F_d
  T min2, max2;      // running min / max of |F_d|^2
  int sgn_re, sgn_im;  // running sum of the signs of Re F_d and Im F_d
};

template <typename T>
SGS_HD void stats_first(BinStats<T>& s, T re, T im) {
  const T m2 = re * re + im * im;
  s.sum_re = re;
  s.sum_im = im;
  s.min2 = m2;
  s.max2 = m2;
  s.sgn_re = signum(re);
  s.sgn_im = signum(im);
}

template <typename T>
SGS_HD void stats_add(BinStats<T>& s, T re, T im) {
  const T m2 = re * re + im * im;
  s.sum_re += re;
  s.sum_im += im;
  s.min2 = m2 < s.min2 ? m2 : s.min2;
  s.max2 = m2 > s.max2 ? m2 : s.max2;
  s.sgn_re += signum(re);
  s.sgn_im += signum(im);
}

// The same statistics with both sign counts in one int (sgn_re + 65536 * sgn_im; |counts| <= D
// < 32768), for kernels that keep every bin's statistics in registers (the cuFFTDx kernel): one
// register less per bin. unpacked() gives the BinStats that recombine_bin takes.
template <typename T>
struct PackedBinStats {
  T sum_re, sum_im, min2, max2;
  int sgn;

  SGS_HD BinStats<T> unpacked() const {
    const int lo = static_cast<int>(static_cast<short>(sgn & 0xffff));  // sign-extended sgn_re
    return BinStats<T>{sum_re, sum_im, min2, max2, lo, (sgn - lo) / 65536};
  }
};

template <typename T>
SGS_HD void stats_first(PackedBinStats<T>& s, T re, T im) {
  const T m2 = re * re + im * im;
  s.sum_re = re;
  s.sum_im = im;
  s.min2 = m2;
  s.max2 = m2;
  s.sgn = signum(re) + 65536 * signum(im);
}

template <typename T>
SGS_HD void stats_add(PackedBinStats<T>& s, T re, T im) {
  const T m2 = re * re + im * im;
  s.sum_re += re;
  s.sum_im += im;
  s.min2 = m2 < s.min2 ? m2 : s.min2;
  s.max2 = m2 > s.max2 ? m2 : s.max2;
  s.sgn += signum(re) + 65536 * signum(im);
}

template <typename T>
struct SurgeryParams {
  int num_domains;
  T tau, rho, alpha, beta;
  bool soft;  // soft mask a * m instead of the hard thresholds
  // The hard mask as exact tests, so that no kernel depends on how precisely its device divides or
  // takes square roots: a real component is kept when |sum of signs| >= kstar, a bin when
  // min2 >= rho2 * max2 (see make_params).
  int kstar;
  T rho2;
};

// Host-side setup of the parameters. kstar is the smallest k with T(k)/T(D) >= T(tau), found with
// exactly the IEEE expression the reference evaluates (thresholds are rounded to the compute type,
// as torch does when comparing a tensor with a scalar); D + 1 when tau > 1 keeps nothing.
template <typename T>
inline SurgeryParams<T> make_params(int D, double tau, double rho, double alpha, double beta, bool soft) {
  const T t = static_cast<T>(tau), d = static_cast<T>(D), r = static_cast<T>(rho);
  int kstar = D + 1;
  for (int k = 0; k <= D; ++k) {
    volatile T level = static_cast<T>(k) / d;  // volatile: no excess precision, no folding
    if (level >= t) {
      kstar = k;
      break;
    }
  }
  return SurgeryParams<T>{D, t, r, static_cast<T>(alpha), static_cast<T>(beta), soft, kstar, r * r};
}

// What the recombination of one bin yields (spectral values).
template <typename T>
struct BinResult {
  T upd_re, upd_im;      // Fbar + alpha * Sh + beta * V
  T mean_re, mean_im;    // Fbar
  T sh_re, sh_im;        // Sh = M * Fbar
  T div_re, div_im;      // V = (1 - M) * (Fa - Fbar)
  T mask_re, mask_im;    // M per real component
};

// Mask and masked recombination of one bin (spec section 3, steps 1-5), given its statistics
// and the assigned domain's value Fa.
template <typename T>
SGS_HD BinResult<T> recombine_bin(const SurgeryParams<T>& p, const BinStats<T>& s, T fa_re, T fa_im) {
  BinResult<T> r;
  const T D = static_cast<T>(p.num_domains);
  r.mean_re = s.sum_re / D;
  r.mean_im = s.sum_im / D;
  const int count_re = s.sgn_re < 0 ? -s.sgn_re : s.sgn_re;
  const int count_im = s.sgn_im < 0 ? -s.sgn_im : s.sgn_im;
  if (p.soft) {
    const T mag = s.max2 > T(0) ? sqrt(s.min2 / s.max2) : T(0);
    r.mask_re = static_cast<T>(count_re) / D * mag;
    r.mask_im = static_cast<T>(count_im) / D * mag;
  } else {
    // min/max >= rho without a division; an all-zero bin (max2 = 0) has agreement 0.
    const bool keep = s.min2 >= p.rho2 * s.max2 && (s.max2 > T(0) || p.rho2 == T(0));
    r.mask_re = (keep && count_re >= p.kstar) ? T(1) : T(0);
    r.mask_im = (keep && count_im >= p.kstar) ? T(1) : T(0);
  }
  r.sh_re = r.mask_re * r.mean_re;
  r.sh_im = r.mask_im * r.mean_im;
  r.div_re = (T(1) - r.mask_re) * (fa_re - r.mean_re);
  r.div_im = (T(1) - r.mask_im) * (fa_im - r.mean_im);
  r.upd_re = r.mean_re + p.alpha * r.sh_re + p.beta * r.div_re;
  r.upd_im = r.mean_im + p.alpha * r.sh_im + p.beta * r.div_im;
  return r;
}

}  // namespace sgs
