"""The cuFFTDx kernel's block algorithm (csrc/sgs_dx.h), run on the host.

csrc/sgs_dx.h holds everything of the dx kernel except the FFTs and the asynchronous copies:
the staging and register layouts, the row/column exchange, real_unpack/real_pack_inverse, the
per-bin statistics kept per thread, the hard/soft mask and the recombination. Here it is compiled
with g++ and run with one ThreadState per thread and a reference DFT that reads and writes the
registers in cuFFTDx's block layout (thread x of FFT y holds elements x + i*X), on the shapes the
CUDA build instantiates (``sgs::dx::Config``) and on small shapes with ragged plane groups, and
compared with the float64 reference. Shared memory starts poisoned with NaN.

What this cannot check (it needs a GPU: tests/test_cuda_paths.py): that cuFFTDx really uses that
register layout for input and output, the cp.async/barrier placement, and the half/bfloat16
conversions.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sgs_cuda.reference import sgs_reference
from sgs_inputs import separated_grads

CSRC = Path(__file__).resolve().parents[1] / "csrc"

# (H, W, X, P): the first five are sgs::dx::Config (checked by the harness), the rest exercise
# ragged groups, several row rounds, X = 1 and odd H.
SHAPES = {
    (28, 28): (1, 8), (32, 32): (4, 2), (64, 64): (8, 1), (32, 64): (8, 1), (64, 32): (8, 2),
    (8, 8): (2, 3), (12, 8): (2, 2), (6, 4): (1, 2), (15, 8): (1, 1),
}

_HARNESS = r"""
#include "sgs_dx.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <type_traits>
#include <vector>

using namespace sgs;
using namespace sgs::dx;

// One CTA on the host: every thread's registers, phases run to completion one after another.
template <class S>
struct HostCtx {
  std::vector<ThreadState<S>> ts;
  bool reverse;
  explicit HostCtx(bool rev) : ts(S::threads), reverse(rev) {
    std::memset(static_cast<void*>(ts.data()), 0xff, sizeof(ThreadState<S>) * ts.size());  // NaN
    for (int y = 0; y < S::F; ++y)
      for (int x = 0; x < S::X; ++x) ts[y * S::X + x].x = x, ts[y * S::X + x].y = y;
  }
  void sync() {}
  template <class Fn>
  void each(Fn&& f) {
    if (reverse)
      for (int i = S::threads - 1; i >= 0; --i) f(ts[i]);
    else
      for (auto& t : ts) f(t);
  }
  // The collective FFT of every FFT id y, elements x + i*X in thread (x, y), unnormalised, forward
  // exp(-2 pi i jk/n), inverse exp(+2 pi i jk/n): what cuFFTDx's c2c block FFT computes.
  template <class Tag, class Get>
  void fft(Tag, Get&& get) {
    constexpr bool row = std::is_same_v<Tag, RowFwd> || std::is_same_v<Tag, RowInv>;
    constexpr bool inverse = std::is_same_v<Tag, RowInv> || std::is_same_v<Tag, ColInv>;
    constexpr int n = row ? S::M : S::H, e = row ? S::Er : S::Ec;
    std::vector<double> re(n), im(n), ore(n), oim(n);
    for (int y = 0; y < S::F; ++y) {
      for (int x = 0; x < S::X; ++x)
        for (int i = 0; i < e; ++i) {
          const Cplx v = get(ts[y * S::X + x])[i];
          re[x + i * S::X] = v.x, im[x + i * S::X] = v.y;
        }
      for (int k = 0; k < n; ++k) {
        double sr = 0, si = 0;
        for (int j = 0; j < n; ++j) {
          const double ang = (inverse ? 2.0 : -2.0) * M_PI * static_cast<double>((static_cast<long>(j) * k) % n) / n;
          sr += re[j] * std::cos(ang) - im[j] * std::sin(ang);
          si += re[j] * std::sin(ang) + im[j] * std::cos(ang);
        }
        ore[k] = sr, oim[k] = si;
      }
      for (int x = 0; x < S::X; ++x)
        for (int i = 0; i < e; ++i)
          get(ts[y * S::X + x])[i] = Cplx{static_cast<float>(ore[x + i * S::X]), static_cast<float>(oim[x + i * S::X])};
    }
  }
  void stage_copy(void* dst, const void* src, int64_t bytes) {
    if (bytes % 16 != 0) { std::fprintf(stderr, "staging copy not in 16-byte chunks\n"); std::exit(3); }
    std::memcpy(dst, src, bytes);
  }
  void stage_commit() {}
  void stage_wait(int) {}
};

static void rd(void* p, size_t n, FILE* f) {
  if (std::fread(p, 1, n, f) != n) { std::fprintf(stderr, "short read\n"); std::exit(2); }
}

template <class S>
int run(const int64_t* h, const double* prm, FILE* in, FILE* out) {
  const int D = static_cast<int>(h[4]);
  const int64_t N = h[5], C = h[6];
  const bool soft = h[7] != 0, reverse = h[8] != 0;
  std::vector<int64_t> assign(N);
  rd(assign.data(), sizeof(int64_t) * N, in);
  const int64_t planes = N * C, pe = static_cast<int64_t>(S::H) * S::W;
  std::vector<double> gd(D * planes * pe);
  rd(gd.data(), sizeof(double) * gd.size(), in);
  std::vector<float> g(gd.begin(), gd.end()), upd(planes * pe, std::nanf(""));
  Args<float> a{g.data(), assign.data(), upd.data(), planes, C, D,
                make_params<float>(D, prm[0], prm[1], prm[2], prm[3], soft)};
  const Layout L = layout<S>(sizeof(float), 0);
  std::vector<unsigned char> smem(L.total + 16);
  for (int64_t group = 0; group * S::P < planes; ++group) {
    std::memset(smem.data(), 0xff, smem.size());
    HostCtx<S> ctx(reverse);
    plane_group<S, float>(ctx, a, smem.data(), L, group);
  }
  std::vector<double> o(upd.begin(), upd.end());
  std::fwrite(o.data(), sizeof(double), o.size(), out);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  FILE* in = std::fopen(argv[1], "rb");
  FILE* out = std::fopen(argv[2], "wb");
  if (!in || !out) return 2;
  int64_t h[9];
  double prm[4];
  rd(h, sizeof(h), in);
  rd(prm, sizeof(prm), in);
  const int64_t H = h[0], W = h[1], X = h[2], P = h[3];
  int rc = 4;
#define SGS_SHAPE(h_, w_, x_, p_) \
  if (H == h_ && W == w_ && X == x_ && P == p_) rc = run<Shape<h_, w_, x_, p_>>(h, prm, in, out);
  SGS_SHAPES
  // the instantiated configurations are the ones tested here
  static_assert(std::is_same_v<Config<28, 28>::S, Shape<28, 28, 1, 8>>);
  static_assert(std::is_same_v<Config<32, 32>::S, Shape<32, 32, 4, 2>>);
  static_assert(std::is_same_v<Config<64, 64>::S, Shape<64, 64, 8, 1>>);
  static_assert(std::is_same_v<Config<32, 64>::S, Shape<32, 64, 8, 1>>);
  static_assert(std::is_same_v<Config<64, 32>::S, Shape<64, 32, 8, 2>>);
  std::fclose(in);
  std::fclose(out);
  return rc;
}
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("sgs_dx")
    shapes = " ".join(f"SGS_SHAPE({h}, {w}, {x}, {p})" for (h, w), (x, p) in SHAPES.items())
    (d / "harness.cpp").write_text(_HARNESS.replace("SGS_SHAPES", shapes))
    exe = d / "harness"
    cmd = [cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", f"-I{CSRC}",
           str(d / "harness.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"dx host emulation build failed:\n{proc.stderr[-8000:]}"
    return exe


def _emulate(exe, tmp_path, grads, assign, X, P, params, mask="hard", reverse=False):
    D, N, C, H, W = grads.shape
    head = np.array([H, W, X, P, D, N, C, mask == "soft", reverse], dtype=np.int64)
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        f.write(head.tobytes())
        f.write(np.array(params, dtype=np.float64).tobytes())
        f.write(assign.numpy().astype(np.int64).tobytes())
        f.write(grads.numpy().astype(np.float64).tobytes())
    proc = subprocess.run([str(exe), str(inp), str(outp)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return torch.from_numpy(np.frombuffer(outp.read_bytes(), dtype=np.float64).copy()).reshape(N, C, H, W)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("hw", list(SHAPES), ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mask", ["hard", "soft"])
def test_dx_block_algorithm_matches_reference(harness, tmp_path, hw, mask):
    H, W = hw
    X, P = SHAPES[hw]
    D, N, C = 3, 3, 2  # 6 planes: a ragged last group whenever P does not divide 6
    params = (1.0, 0.25, 1.0, 0.5)
    grads = separated_grads(D, N, C, H, W, rho=params[1], seed=H * 1000 + W)
    assign = torch.tensor([2, 0, 1])
    got = _emulate(harness, tmp_path, grads, assign, X, P, params, mask=mask, reverse=(H + W) % 3 == 0)
    ref = sgs_reference(grads, assign, *params, mask)
    assert _rel(got, ref) < 1e-5, (hw, mask)


@pytest.mark.parametrize("tau,rho", [(2 / 3, 0.0), (1.0, 0.6), (0.0, 0.25)])
def test_dx_thresholds(harness, tmp_path, tau, rho):
    """Other thresholds, D = 4, every image assigned a different domain."""
    grads = separated_grads(4, 4, 1, 32, 32, rho=rho, seed=7)
    assign = torch.tensor([3, 1, 0, 2])
    params = (tau, rho, 0.5, 1.5)
    got = _emulate(harness, tmp_path, grads, assign, 4, 2, params)
    assert _rel(got, sgs_reference(grads, assign, *params, "hard")) < 1e-5


def test_dx_single_domain(harness, tmp_path):
    grads = separated_grads(1, 2, 1, 32, 32, seed=3)
    assign = torch.zeros(2, dtype=torch.long)
    got = _emulate(harness, tmp_path, grads, assign, 4, 2, (1.0, 0.25, 1.0, 0.25))
    assert _rel(got, sgs_reference(grads, assign, 1.0, 0.25, 1.0, 0.25, "hard")) < 1e-5
