// CPU kernel of sgs::surgery: a parallel loop over (image, channel) planes; each plane reads
// its D domain planes once, transforms them with the lane-batched FFT of sgs_math.h, keeps the
// agreement statistics per bin, recombines and writes the update once.
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <vector>

#include "sgs_ops.h"
#include "sgs_math.h"

namespace sgs {
namespace {

template <typename T>
struct Twiddles {
  std::vector<T> re, im;
  explicit Twiddles(int n) : re(n), im(n) {
    for (int k = 0; k < n; ++k) {
      double r, i;
      twiddle(k, n, r, i);
      re[k] = static_cast<T>(r);
      im[k] = static_cast<T>(i);
    }
  }
};

// Lane-batched complex FFT in place of (re, im), using (tre, tim) as the Stockham ping-pong
// buffer; on return the pointers name the buffers that hold the result.
template <typename T>
void fft_lanes(const FftPlan& plan, const Twiddles<T>& tw, bool inverse, T*& re, T*& im, T*& tre,
               T*& tim, int stride, int lanes) {
  int Ns = 1;
  for (int f = 0; f < plan.nfactors; ++f) {
    const int R = plan.factors[f];
    for (int j = 0; j < plan.n / R; ++j)
      fft_stage<T>(plan.n, R, Ns, j, inverse, tw.re.data(), tw.im.data(), re, im, tre, tim, stride, 0, lanes);
    std::swap(re, tre);
    std::swap(im, tim);
    Ns *= R;
  }
}

// Everything one worker needs for one plane size, allocated once per parallel chunk.
template <typename T>
struct PlaneWorkspace {
  int H, W, Wr, M;  // M: length of the row transform (W/2 for even W, W for odd W)
  bool even;
  FftPlan plan_rows, plan_cols;
  const Twiddles<T>& tw_rows;  // length M
  const Twiddles<T>& tw_cols;  // length H
  const Twiddles<T>& tw_w;     // length W: the real-FFT unpack twiddles
  std::vector<T> a_re, a_im, b_re, b_im;  // row-transform buffers [M][H]
  std::vector<T> c_re, c_im, d_re, d_im;  // half-spectrum buffers [H][Wr]

  PlaneWorkspace(int H_, int W_, const Twiddles<T>& rows, const Twiddles<T>& cols, const Twiddles<T>& w)
      : H(H_), W(W_), Wr(W_ / 2 + 1), M(W_ % 2 == 0 ? W_ / 2 : W_), even(W_ % 2 == 0),
        plan_rows(make_plan(M)), plan_cols(make_plan(H_)), tw_rows(rows), tw_cols(cols), tw_w(w),
        a_re(M * H), a_im(M * H), b_re(M * H), b_im(M * H),
        c_re(H * Wr), c_im(H * Wr), d_re(H * Wr), d_im(H * Wr) {}

  // rfft2 of a contiguous H x W plane; returns pointers to the half-spectrum [H][Wr].
  template <typename In>
  void forward(const In* x, const T*& out_re, const T*& out_im) {
    T *re = a_re.data(), *im = a_im.data(), *tre = b_re.data(), *tim = b_im.data();
    for (int h = 0; h < H; ++h) {  // transpose rows into lanes (and pack pairs when W is even)
      const In* row = x + static_cast<int64_t>(h) * W;
      if (even) {
        for (int j = 0; j < M; ++j) {
          re[j * H + h] = static_cast<T>(row[2 * j]);
          im[j * H + h] = static_cast<T>(row[2 * j + 1]);
        }
      } else {
        for (int j = 0; j < M; ++j) {
          re[j * H + h] = static_cast<T>(row[j]);
          im[j * H + h] = T(0);
        }
      }
    }
    fft_lanes(plan_rows, tw_rows, false, re, im, tre, tim, H, H);
    T *sre = c_re.data(), *sim = c_im.data(), *sre2 = d_re.data(), *sim2 = d_im.data();
    for (int k = 0; k < Wr; ++k) {  // unpack into the half-spectrum layout [H][Wr]
      if (even) {
        const T* zk_re = re + (k % M) * H;
        const T* zk_im = im + (k % M) * H;
        const T* zc_re = re + ((M - k) % M) * H;
        const T* zc_im = im + ((M - k) % M) * H;
        const T wr = tw_w.re[k], wi = tw_w.im[k];
        for (int h = 0; h < H; ++h)
          real_unpack(zk_re[h], zk_im[h], zc_re[h], zc_im[h], wr, wi, sre[h * Wr + k], sim[h * Wr + k]);
      } else {
        for (int h = 0; h < H; ++h) {
          sre[h * Wr + k] = re[k * H + h];
          sim[h * Wr + k] = im[k * H + h];
        }
      }
    }
    fft_lanes(plan_cols, tw_cols, false, sre, sim, sre2, sim2, Wr, Wr);
    // Bins that are their own conjugate are exactly real for real input; clear the rounding
    // noise so that its sign does not count in the agreement statistics.
    for (int h = 0; h < H; h += (H % 2 == 0 && H > 1) ? H / 2 : H)
      for (int k = 0; k < Wr; k += (even && M > 0) ? M : Wr) sim[h * Wr + k] = T(0);
    out_re = sre;
    out_im = sim;
  }

  // irfft2 (torch semantics, s=(H, W)) of the half-spectrum (spec_re, spec_im) [H][Wr], which
  // is overwritten; writes the H x W plane y scaled by `scale` (on top of 1/(H*W)).
  template <typename Out>
  void inverse(T* spec_re, T* spec_im, Out* y, T scale = T(1)) {
    T *sre = spec_re, *sim = spec_im, *tre = d_re.data(), *tim = d_im.data();
    fft_lanes(plan_cols, tw_cols, true, sre, sim, tre, tim, Wr, Wr);
    T *re = a_re.data(), *im = a_im.data(), *bre = b_re.data(), *bim = b_im.data();
    for (int k = 0; k < M; ++k) {  // back into lanes of rows
      if (even) {
        const T wr = tw_w.re[k], wi = tw_w.im[k];
        for (int h = 0; h < H; ++h)
          real_pack_inverse(k, sre[h * Wr + k], sim[h * Wr + k], sre[h * Wr + M - k], sim[h * Wr + M - k],
                            wr, wi, re[k * H + h], im[k * H + h]);
      } else if (k < Wr) {  // Hermitian completion; irfft ignores Im of the zero-frequency bin
        for (int h = 0; h < H; ++h) {
          re[k * H + h] = sre[h * Wr + k];
          im[k * H + h] = k == 0 ? T(0) : sim[h * Wr + k];
        }
      } else {
        for (int h = 0; h < H; ++h) {
          re[k * H + h] = sre[h * Wr + W - k];
          im[k * H + h] = -sim[h * Wr + W - k];
        }
      }
    }
    fft_lanes(plan_rows, tw_rows, true, re, im, bre, bim, H, H);
    const T s = scale / static_cast<T>(H * M);
    for (int h = 0; h < H; ++h) {
      Out* row = y + static_cast<int64_t>(h) * W;
      if (even) {
        for (int j = 0; j < M; ++j) {
          row[2 * j] = static_cast<Out>(re[j * H + h] * s);
          row[2 * j + 1] = static_cast<Out>(im[j * H + h] * s);
        }
      } else {
        for (int j = 0; j < M; ++j) row[j] = static_cast<Out>(re[j * H + h] * s);
      }
    }
  }
};

// mean/shared/diversity: null unless the parts are wanted; stats: null unless the sums are.
template <typename In, typename T>
void surgery_kernel(const at::Tensor& grads, const at::Tensor& assign, const SurgeryParams<T>& p,
                    at::Tensor& update, at::Tensor* mean, at::Tensor* shared, at::Tensor* diversity,
                    at::Tensor* stats) {
  const int64_t D = grads.size(0), N = grads.size(1), C = grads.size(2);
  const int H = static_cast<int>(grads.size(3)), W = static_cast<int>(grads.size(4));
  const int Wr = W / 2 + 1, M = W % 2 == 0 ? W / 2 : W;
  const int64_t plane = static_cast<int64_t>(H) * W, bins = static_cast<int64_t>(H) * Wr;
  const In* g = grads.data_ptr<In>();
  const int64_t* asg = assign.data_ptr<int64_t>();
  In* out = update.data_ptr<In>();
  const bool parts = mean != nullptr, sums = stats != nullptr;
  std::vector<double> plane_stats(sums ? N * C * 4 : 0);
  const Twiddles<T> tw_rows(M), tw_cols(H), tw_w(W);

  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    PlaneWorkspace<T> ws(H, W, tw_rows, tw_cols, tw_w);
    std::vector<BinStats<T>> st(bins);
    std::vector<T> fa_re(bins), fa_im(bins), u_re(bins), u_im(bins);
    std::vector<T> sh_re, sh_im, dv_re, dv_im, mean_sp;
    if (parts) {
      sh_re.resize(bins), sh_im.resize(bins), dv_re.resize(bins), dv_im.resize(bins);
      mean_sp.resize(plane);
    }
    for (int64_t pc = begin; pc < end; ++pc) {
      const int64_t n = pc / C;
      const int64_t a = asg[n];
      if (parts) std::fill(mean_sp.begin(), mean_sp.end(), T(0));
      for (int64_t d = 0; d < D; ++d) {
        const In* x = g + (d * N * C + pc) * plane;
        const T *fre, *fim;
        ws.forward(x, fre, fim);
        if (d == 0) {
          for (int64_t b = 0; b < bins; ++b) stats_first(st[b], fre[b], fim[b]);
        } else {
          for (int64_t b = 0; b < bins; ++b) stats_add(st[b], fre[b], fim[b]);
        }
        if (d == a) {
          std::copy(fre, fre + bins, fa_re.begin());
          std::copy(fim, fim + bins, fa_im.begin());
        }
        if (parts)
          for (int64_t i = 0; i < plane; ++i) mean_sp[i] += static_cast<T>(x[i]);
      }
      double mask_sum = 0, sh_energy = 0, mean_energy = 0;
      for (int64_t b = 0; b < bins; ++b) {
        const BinResult<T> r = recombine_bin(p, st[b], fa_re[b], fa_im[b]);
        u_re[b] = r.upd_re;
        u_im[b] = r.upd_im;
        if (parts) sh_re[b] = r.sh_re, sh_im[b] = r.sh_im, dv_re[b] = r.div_re, dv_im[b] = r.div_im;
        if (sums) {
          mask_sum += static_cast<double>(r.mask_re) + static_cast<double>(r.mask_im);
          sh_energy += static_cast<double>(r.sh_re) * r.sh_re + static_cast<double>(r.sh_im) * r.sh_im;
          mean_energy += static_cast<double>(r.mean_re) * r.mean_re + static_cast<double>(r.mean_im) * r.mean_im;
        }
      }
      ws.inverse(u_re.data(), u_im.data(), out + pc * plane);
      if (parts) {
        ws.inverse(sh_re.data(), sh_im.data(), shared->data_ptr<In>() + pc * plane);
        ws.inverse(dv_re.data(), dv_im.data(), diversity->data_ptr<In>() + pc * plane);
        In* m = mean->data_ptr<In>() + pc * plane;
        for (int64_t i = 0; i < plane; ++i) m[i] = static_cast<In>(mean_sp[i] / static_cast<T>(D));
      }
      if (sums) {
        double* s = plane_stats.data() + pc * 4;
        s[0] = mask_sum, s[1] = 2.0 * bins, s[2] = sh_energy, s[3] = mean_energy;
      }
    }
  });
  if (sums) {  // fixed-order reduction: the same result whatever the thread count
    double* s = stats->data_ptr<double>();
    for (int64_t i = 0; i < N * C; ++i)
      for (int q = 0; q < 4; ++q) s[q] += plane_stats[i * 4 + q];
  }
}


// Statistics of the agreement test for one bin of one domain: the signs of (re, im) and the
// squared magnitude times inv_energy (1, or 1 / the plane's half-spectrum energy when the
// magnitudes are equalized). The sums are not touched: the general kernel keeps them apart.
template <typename T>
inline void test_stats(BinStats<T>& s, bool first, T re, T im, T inv_energy) {
  const T m2 = (re * re + im * im) * inv_energy;
  if (first) {
    s.min2 = m2;
    s.max2 = m2;
    s.sgn_re = signum(re);
    s.sgn_im = signum(im);
  } else {
    s.min2 = m2 < s.min2 ? m2 : s.min2;
    s.max2 = m2 > s.max2 ? m2 : s.max2;
    s.sgn_re += signum(re);
    s.sgn_im += signum(im);
  }
}

// 1 / sum of |F|^2 over the half spectrum (what reference.spectral_mask(equalize=True) divides
// the squared magnitudes by), or 1 for an all-zero plane.
template <typename T>
inline T inverse_energy(const T* re, const T* im, int64_t bins) {
  T e = T(0);
  for (int64_t b = 0; b < bins; ++b) e += re[b] * re[b] + im[b] * im[b];
  return e > T(0) ? T(1) / e : T(1);
}

// sgs::surgery_general: the mask read from the spectra of `agree` (null: of grads), optionally
// with each domain plane's magnitudes equalized; update = irfft2(mean_weight * Fbar + alpha * Sh
// + beta * V + decay * (1 - M) * rfft2(images)). Parts and stats as surgery_kernel's.
template <typename In, typename T>
void general_kernel(const at::Tensor& grads, const at::Tensor& assign, const at::Tensor* agree,
                    const at::Tensor* images, const SurgeryParams<T>& p, T mean_weight, T decay, bool equalize,
                    at::Tensor& update, at::Tensor& mean, at::Tensor& shared, at::Tensor& diversity,
                    at::Tensor& stats) {
  const int64_t D = grads.size(0), N = grads.size(1), C = grads.size(2);
  const int H = static_cast<int>(grads.size(3)), W = static_cast<int>(grads.size(4));
  const int Wr = W / 2 + 1, M = W % 2 == 0 ? W / 2 : W;
  const int64_t plane = static_cast<int64_t>(H) * W, bins = static_cast<int64_t>(H) * Wr;
  const In* g = grads.data_ptr<In>();
  const In* ag = agree ? agree->data_ptr<In>() : nullptr;
  const In* im_in = images ? images->data_ptr<In>() : nullptr;
  const int64_t* asg = assign.data_ptr<int64_t>();
  In* out = update.data_ptr<In>();
  std::vector<double> plane_stats(N * C * 4);
  const Twiddles<T> tw_rows(M), tw_cols(H), tw_w(W);

  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    PlaneWorkspace<T> ws(H, W, tw_rows, tw_cols, tw_w);
    std::vector<BinStats<T>> st(bins);
    std::vector<T> sum_re(bins), sum_im(bins), fa_re(bins), fa_im(bins), u_re(bins), u_im(bins);
    std::vector<T> sh_re(bins), sh_im(bins), dv_re(bins), dv_im(bins), mean_sp(plane);
    std::vector<T> own_re(im_in ? bins : 0), own_im(im_in ? bins : 0);
    for (int64_t pc = begin; pc < end; ++pc) {
      const int64_t n = pc / C;
      const int64_t a = asg[n];
      std::fill(mean_sp.begin(), mean_sp.end(), T(0));
      for (int64_t d = 0; d < D; ++d) {
        const In* x = g + (d * N * C + pc) * plane;
        const T *fre, *fim;
        ws.forward(x, fre, fim);
        if (d == 0) {
          std::copy(fre, fre + bins, sum_re.begin());
          std::copy(fim, fim + bins, sum_im.begin());
        } else {
          for (int64_t b = 0; b < bins; ++b) sum_re[b] += fre[b], sum_im[b] += fim[b];
        }
        if (d == a) {
          std::copy(fre, fre + bins, fa_re.begin());
          std::copy(fim, fim + bins, fa_im.begin());
        }
        for (int64_t i = 0; i < plane; ++i) mean_sp[i] += static_cast<T>(x[i]);
        if (ag) ws.forward(ag + (d * N * C + pc) * plane, fre, fim);  // the spectrum the test reads
        const T inv_energy = equalize ? inverse_energy(fre, fim, bins) : T(1);
        for (int64_t b = 0; b < bins; ++b) test_stats(st[b], d == 0, fre[b], fim[b], inv_energy);
      }
      if (im_in) {
        const T *fre, *fim;
        ws.forward(im_in + pc * plane, fre, fim);
        std::copy(fre, fre + bins, own_re.begin());
        std::copy(fim, fim + bins, own_im.begin());
      }
      double mask_sum = 0, sh_energy = 0, mean_energy = 0;
      for (int64_t b = 0; b < bins; ++b) {
        BinStats<T> s = st[b];
        s.sum_re = sum_re[b];
        s.sum_im = sum_im[b];
        const BinResult<T> r = recombine_bin(p, s, fa_re[b], fa_im[b]);
        T ur = mean_weight * r.mean_re + p.alpha * r.sh_re + p.beta * r.div_re;
        T ui = mean_weight * r.mean_im + p.alpha * r.sh_im + p.beta * r.div_im;
        if (im_in) {
          ur += decay * (T(1) - r.mask_re) * own_re[b];
          ui += decay * (T(1) - r.mask_im) * own_im[b];
        }
        u_re[b] = ur, u_im[b] = ui;
        sh_re[b] = r.sh_re, sh_im[b] = r.sh_im, dv_re[b] = r.div_re, dv_im[b] = r.div_im;
        mask_sum += static_cast<double>(r.mask_re) + static_cast<double>(r.mask_im);
        sh_energy += static_cast<double>(r.sh_re) * r.sh_re + static_cast<double>(r.sh_im) * r.sh_im;
        mean_energy += static_cast<double>(r.mean_re) * r.mean_re + static_cast<double>(r.mean_im) * r.mean_im;
      }
      ws.inverse(u_re.data(), u_im.data(), out + pc * plane);
      ws.inverse(sh_re.data(), sh_im.data(), shared.data_ptr<In>() + pc * plane);
      ws.inverse(dv_re.data(), dv_im.data(), diversity.data_ptr<In>() + pc * plane);
      In* m = mean.data_ptr<In>() + pc * plane;
      for (int64_t i = 0; i < plane; ++i) m[i] = static_cast<In>(mean_sp[i] / static_cast<T>(D));
      double* ps = plane_stats.data() + pc * 4;
      ps[0] = mask_sum, ps[1] = 2.0 * bins, ps[2] = sh_energy, ps[3] = mean_energy;
    }
  });
  double* s = stats.data_ptr<double>();  // fixed-order reduction: the same result whatever the thread count
  for (int64_t i = 0; i < N * C; ++i)
    for (int q = 0; q < 4; ++q) s[q] += plane_stats[i * 4 + q];
}

}  // namespace

std::vector<at::Tensor> surgery_cpu_impl(const at::Tensor& grads_in, const at::Tensor& assign_in, double tau,
                                         double rho, double alpha, double beta, bool soft, Outputs what) {
  const at::Tensor grads = grads_in.contiguous();
  const at::Tensor assign = assign_in.to(at::kLong).contiguous();
  SurgeryOutputs outs(grads, what);
  const bool parts = outs.parts();
  at::Tensor &update = outs.update, &mean = outs.mean, &shared = outs.shared, &diversity = outs.diversity,
             &stats = outs.stats;
  if (grads.numel() == 0) return outs.list();
  const int64_t D = grads.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads.scalar_type(), "sgs_surgery_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    surgery_kernel<scalar_t, T>(grads, assign, make_params<T>(static_cast<int>(D), tau, rho, alpha, beta, soft), update,
                                parts ? &mean : nullptr, parts ? &shared : nullptr,
                                parts ? &diversity : nullptr, outs.with_stats() ? &stats : nullptr);
  });
  return outs.list();
}

std::vector<at::Tensor> surgery_general_cpu_impl(const at::Tensor& grads_in, const at::Tensor& assign_in,
                                                 const c10::optional<at::Tensor>& agree_on,
                                                 const c10::optional<at::Tensor>& images, double tau, double rho,
                                                 double alpha, double beta, double mean_weight, double decay,
                                                 bool soft, bool equalize) {
  const at::Tensor grads = grads_in.contiguous();
  const at::Tensor assign = assign_in.to(at::kLong).contiguous();
  SurgeryOutputs outs(grads, Outputs::kParts);
  if (grads.numel() == 0) return outs.list();
  const at::Tensor agree = agree_on.has_value() ? agree_on->contiguous() : at::Tensor();
  // Images only count with a nonzero decay (as in the reference): no transform otherwise.
  const at::Tensor own = (decay != 0 && images.has_value()) ? images->contiguous() : at::Tensor();
  const int64_t D = grads.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads.scalar_type(), "sgs_surgery_general_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    general_kernel<scalar_t, T>(grads, assign, agree.defined() ? &agree : nullptr, own.defined() ? &own : nullptr,
                                make_params<T>(static_cast<int>(D), tau, rho, alpha, beta, soft),
                                static_cast<T>(mean_weight), static_cast<T>(decay), equalize, outs.update, outs.mean,
                                outs.shared, outs.diversity, outs.stats);
  });
  return outs.list();
}

}  // namespace sgs
