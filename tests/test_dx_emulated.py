"""The cuFFTDx kernel's block algorithm (csrc/sgs_dx.h), run on the host.

csrc/sgs_dx.h holds everything of the dx kernel except the FFTs, the shuffles and the data
movement that needs a device: the staging and register layouts, the persistent loop over plane
groups with the next group's first domain prefetched, the row/column exchange (through the
distributed shared memory of a 2-CTA cluster at 128x128), real_unpack/real_pack_inverse, the split
FFTs' cross-thread radix-2 stages and twiddles (28x28), the per-bin statistics kept per thread,
the hard/soft mask, the recombination and the diagnostic sums. Here it is compiled with g++ and
run with one ThreadState per thread, one std::thread per CTA of a cluster (the CTAs take turns
between cluster barriers, in rank order or reversed, so a missing barrier shows as a wrong result
rather than a race), staging copies that complete only at stage_wait (their destination poisoned
until then), a reference DFT in cuFFTDx's register layout for the block FFTs and for the thread
FFTs of the split kind, and shuffles emulated pairwise; on the shapes the CUDA build instantiates
(``sgs::dx::Config``) and on small shapes with ragged plane groups, several groups per CTA,
clusters of 2 and 4 and idle CTAs; compared with the float64 reference (update and the four
diagnostic sums). Shared memory and registers start poisoned with NaN.

What this cannot check (it needs a GPU: tests/test_cuda_paths.py, and compute-sanitizer's
racecheck in benchmarks/gpu_check.sh): that cuFFTDx really uses that register layout for input
and output (compile-time asserts in sgs_cuda_dx.cuh check the traits it publishes), the
cp.async/barrier/cluster-barrier placement under real concurrency, distributed shared memory
mapping, warp-shuffle masks, the occupancy-sized grid, the atomics, the half/bfloat16 conversions.
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

# (H, W): (X, P, CS, split). The first eight are sgs::dx::Config (checked by the harness); the rest
# exercise ragged groups, several row rounds, X = 1, odd H, split FFTs of 2, 4 and 8 threads,
# clusters of 2 and 4 (one CTA of which owns no column).
SHAPES = {
    (28, 28): (2, 4, 1, True), (32, 32): (4, 2, 1, False), (64, 64): (8, 1, 1, False),
    (32, 64): (8, 1, 1, False), (64, 32): (8, 2, 1, False), (128, 128): (16, 1, 2, False),
    (64, 128): (8, 1, 1, False), (128, 64): (16, 1, 1, False),
    (8, 8): (2, 3, 1, False), (12, 8): (2, 2, 1, False), (6, 4): (1, 2, 1, False), (15, 8): (1, 1, 1, False),
    (12, 12): (2, 2, 1, True), (16, 16): (4, 1, 1, True), (8, 16): (8, 2, 1, True),
    (16, 12): (2, 1, 2, False), (16, 8): (4, 1, 4, False), (12, 16): (2, 1, 2, True),
}
CONFIG = [(28, 28), (32, 32), (64, 64), (32, 64), (64, 32), (128, 128), (64, 128), (128, 64)]

_HARNESS = r"""
#include "sgs_dx.h"

#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

using namespace sgs;
using namespace sgs::dx;

// The CTAs of a cluster take turns: between two cluster barriers CTA order(r) runs alone, so the
// result is deterministic, and a barrier missing before a read of another CTA's writes (or
// before a write over what another CTA still reads) changes it in one of the two orders.
struct Turnstile {
  std::mutex mu;
  std::condition_variable cv;
  int n;
  bool reverse;
  int turn = 0, arrived = 0;
  long gen = 0;
  Turnstile(int n_, bool rev) : n(n_), reverse(rev) {}
  int order(int r) const { return reverse ? n - 1 - r : r; }
  void begin(int r) {
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return turn == order(r); });
  }
  void sync(int r) {
    std::unique_lock<std::mutex> lk(mu);
    ++turn;
    const long g = gen;
    if (++arrived == n) {
      arrived = 0;
      turn = 0;
      ++gen;
    }
    cv.notify_all();
    cv.wait(lk, [&] { return gen != g && turn == order(r); });
  }
  void end() {
    std::unique_lock<std::mutex> lk(mu);
    ++turn;
    cv.notify_all();
  }
};

template <class T>
struct IsThread : std::false_type {};
template <int E, bool I>
struct IsThread<ThreadFft<E, I>> : std::true_type {
  static constexpr int e = E;
  static constexpr bool inverse = I;
};

// Reference DFT of n values, unnormalised: forward exp(-2 pi i jk/n), inverse exp(+2 pi i jk/n).
static void dft(std::vector<double>& re, std::vector<double>& im, bool inverse) {
  const int n = static_cast<int>(re.size());
  std::vector<double> ore(n), oim(n);
  for (int k = 0; k < n; ++k) {
    double sr = 0, si = 0;
    for (int j = 0; j < n; ++j) {
      const double ang = (inverse ? 2.0 : -2.0) * M_PI * static_cast<double>((static_cast<long>(j) * k) % n) / n;
      sr += re[j] * std::cos(ang) - im[j] * std::sin(ang);
      si += re[j] * std::sin(ang) + im[j] * std::cos(ang);
    }
    ore[k] = sr, oim[k] = si;
  }
  re = ore, im = oim;
}

// One CTA on the host: every thread's registers, phases run to completion one after another.
template <class S>
struct HostCtx {
  struct Copy {
    void* dst;
    const void* src;
    int64_t bytes;
  };
  std::vector<ThreadState<S>> ts;
  bool reverse;
  int rank;
  unsigned char** smems;
  int64_t smem_bytes;
  Turnstile* turn;
  std::deque<std::vector<Copy>> pending;
  std::vector<Copy> open;

  HostCtx(bool rev, int r, unsigned char** mems, int64_t bytes, Turnstile* t)
      : ts(S::threads), reverse(rev), rank(r), smems(mems), smem_bytes(bytes), turn(t) {
    std::memset(static_cast<void*>(ts.data()), 0xff, sizeof(ThreadState<S>) * ts.size());  // NaN
    for (int y = 0; y < S::F; ++y)
      for (int x = 0; x < S::X; ++x) ts[y * S::X + x].x = x, ts[y * S::X + x].y = y;
  }
  void sync() {}
  int cluster_syncs = 0;
  void cluster_sync() {
    if (S::CS == 1) { std::fprintf(stderr, "cluster_sync without a cluster\n"); std::exit(3); }
    ++cluster_syncs;
    turn->sync(rank);
  }
  template <typename T>
  T* remote(T* p, int r) {
    const std::ptrdiff_t off = reinterpret_cast<unsigned char*>(p) - smems[rank];
    if (off < 0 || off >= smem_bytes || r < 0 || r >= S::CS) {
      std::fprintf(stderr, "remote(): pointer outside shared memory or bad rank %d\n", r);
      std::exit(3);
    }
    if (r != rank && cluster_syncs == 0) {  // CUDA: the peer may not be running yet
      std::fprintf(stderr, "remote(): distributed shared memory accessed before the first cluster barrier\n");
      std::exit(3);
    }
    return reinterpret_cast<T*>(smems[r] + off);
  }
  template <class Fn>
  void each(Fn&& f) {
    if (reverse)
      for (int i = S::threads - 1; i >= 0; --i) f(ts[i]);
    else
      for (auto& t : ts) f(t);
  }
  // Block FFTs: FFT id y over its X threads, element x + i*X in thread (x, y), in and out.
  // Thread FFTs: each thread's own E elements, natural order.
  template <class Tag, class Get>
  void fft(Tag, Get&& get) {
    if constexpr (IsThread<Tag>::value) {
      constexpr int e = IsThread<Tag>::e;
      std::vector<double> re(e), im(e);
      for (auto& t : ts) {
        Cplx* v = get(t);
        for (int i = 0; i < e; ++i) re[i] = v[i].x, im[i] = v[i].y;
        dft(re, im, IsThread<Tag>::inverse);
        for (int i = 0; i < e; ++i) v[i] = Cplx{static_cast<float>(re[i]), static_cast<float>(im[i])};
      }
    } else {
      constexpr bool row = std::is_same_v<Tag, RowFwd> || std::is_same_v<Tag, RowInv>;
      constexpr bool inverse = std::is_same_v<Tag, RowInv> || std::is_same_v<Tag, ColInv>;
      constexpr int n = row ? S::M : S::H, e = row ? S::Er : S::Ec;
      if (S::kind != Fft::kBlock) { std::fprintf(stderr, "block FFT in a split shape\n"); std::exit(3); }
      std::vector<double> re(n), im(n);
      for (int y = 0; y < S::F; ++y) {
        for (int x = 0; x < S::X; ++x)
          for (int i = 0; i < e; ++i) {
            const Cplx v = get(ts[y * S::X + x])[i];
            re[x + i * S::X] = v.x, im[x + i * S::X] = v.y;
          }
        dft(re, im, inverse);
        for (int x = 0; x < S::X; ++x)
          for (int i = 0; i < e; ++i)
            get(ts[y * S::X + x])[i] = Cplx{static_cast<float>(re[x + i * S::X]), static_cast<float>(im[x + i * S::X])};
      }
    }
  }
  // A shuffle stage: thread x receives what thread x ^ m of the same FFT id sends.
  template <int E, class Get, class Pre, class Post>
  void exchange(int m, Get&& get, Pre&& pre, Post&& post) {
    if (m <= 0 || m >= S::X) { std::fprintf(stderr, "exchange across FFT ids (m = %d)\n", m); std::exit(3); }
    std::vector<Cplx> sent(static_cast<size_t>(S::X) * E);
    for (int y = 0; y < S::F; ++y) {
      for (int x = 0; x < S::X; ++x)
        for (int i = 0; i < E; ++i) sent[x * E + i] = pre(x, get(ts[y * S::X + x])[i]);
      for (int x = 0; x < S::X; ++x)
        for (int i = 0; i < E; ++i) get(ts[y * S::X + x])[i] = post(x, sent[x * E + i], sent[(x ^ m) * E + i]);
    }
  }
  // Mirror exchange: what each thread would receive by shuffles, then fn in the warps that take part.
  template <int E, class Get, class Fn>
  void mirror(Get&& get, int r, Fn&& fn) {
    std::vector<Cplx> other(static_cast<size_t>(S::threads) * E);
    for (int i = 0; i < S::threads; ++i)
      for (int e = 0; e < E; ++e) {
        const int src = ts[i].y * S::X + mirror_thread<S, E>(ts[i].x, e);
        other[i * E + e] = mirror_value<S, E>(get(ts[src]), ts[src].x, e);
      }
    for (int i = 0; i < S::threads; ++i)
      if (warp_holds_packed<S>(i / 32, r))
        for (int e = 0; e < E; ++e) get(ts[i])[e] = fn(ts[i], e, get(ts[i])[e], other[i * E + e]);
  }
  // Copies complete at stage_wait; until then their destination holds NaN.
  void stage_copy(void* dst, const void* src, int64_t bytes) {
    if (bytes % 16 != 0) { std::fprintf(stderr, "staging copy not in 16-byte chunks\n"); std::exit(3); }
    std::memset(dst, 0xff, bytes);
    open.push_back(Copy{dst, src, bytes});
  }
  void stage_commit() {
    pending.push_back(open);
    open.clear();
  }
  void stage_wait(int n) {
    while (static_cast<int>(pending.size()) > n) {
      for (const Copy& c : pending.front()) std::memcpy(c.dst, c.src, c.bytes);
      pending.pop_front();
    }
  }
  void sums_add(double* slots) {
    for (int i = 0; i < S::threads; ++i)
      for (int q = 0; q < 4; ++q) slots[(i / 32) * 4 + q] += static_cast<double>(ts[i].sums[q]);
  }
  void sums_flush(const double* slots, double* out) {
    for (int w = 0; w < S::warps; ++w)
      for (int q = 0; q < 4; ++q) out[q] += slots[w * 4 + q];
  }
};

static void rd(void* p, size_t n, FILE* f) {
  if (std::fread(p, 1, n, f) != n) { std::fprintf(stderr, "short read\n"); std::exit(2); }
}

template <class S>
int run(const int64_t* h, const double* prm, FILE* in, FILE* out) {
  const int D = static_cast<int>(h[6]);
  const int64_t N = h[7], C = h[8], grid = h[11];
  const bool soft = h[9] != 0, reverse = h[10] != 0;
  std::vector<int64_t> assign(N);
  rd(assign.data(), sizeof(int64_t) * N, in);
  const int64_t planes = N * C, pe = static_cast<int64_t>(S::H) * S::W;
  std::vector<double> gd(D * planes * pe);
  rd(gd.data(), sizeof(double) * gd.size(), in);
  std::vector<float> g(gd.begin(), gd.end()), upd(planes * pe, std::nanf(""));
  double stats[4] = {0, 0, 0, 0};
  Args<float> a{g.data(), assign.data(), upd.data(), stats, planes, C, D,
                make_params<float>(D, prm[0], prm[1], prm[2], prm[3], soft)};
  const Layout L = layout<S>(sizeof(float), 0);
  for (int64_t cluster = 0; cluster < grid; ++cluster) {
    std::vector<std::vector<unsigned char>> mem(S::CS, std::vector<unsigned char>(L.total, 0xff));  // NaN
    std::vector<unsigned char*> ptrs(S::CS);
    for (int r = 0; r < S::CS; ++r) ptrs[r] = mem[r].data();
    Turnstile turn(S::CS, reverse);
    std::vector<std::thread> ctas;
    for (int r = 0; r < S::CS; ++r)
      ctas.emplace_back([&, r] {
        turn.begin(r);
        HostCtx<S> ctx(reverse, r, ptrs.data(), L.total, &turn);
        run_cta<S, float>(ctx, a, ptrs[r], L, cluster, grid, r);
        if (!ctx.pending.empty() || !ctx.open.empty()) { std::fprintf(stderr, "copies left in flight\n"); std::exit(3); }
        turn.end();
      });
    for (auto& t : ctas) t.join();
  }
  std::vector<double> o(upd.begin(), upd.end());
  o.insert(o.end(), stats, stats + 4);
  std::fwrite(o.data(), sizeof(double), o.size(), out);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  FILE* in = std::fopen(argv[1], "rb");
  FILE* out = std::fopen(argv[2], "wb");
  if (!in || !out) return 2;
  int64_t h[12];
  double prm[4];
  rd(h, sizeof(h), in);
  rd(prm, sizeof(prm), in);
  const int64_t H = h[0], W = h[1], X = h[2], P = h[3], CS = h[4], split = h[5];
  int rc = 4;
#define SGS_SHAPE(h_, w_, x_, p_, cs_, split_)                                                   \
  if (H == h_ && W == w_ && X == x_ && P == p_ && CS == cs_ && split == split_)                 \
    rc = run<Shape<h_, w_, x_, p_, cs_, split_ ? Fft::kSplit : Fft::kBlock>>(h, prm, in, out);
  SGS_SHAPES
  // the instantiated configurations are the ones tested here
  SGS_CONFIG_CHECKS
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
    shapes = " ".join(f"SGS_SHAPE({h}, {w}, {x}, {p}, {cs}, {int(sp)})" for (h, w), (x, p, cs, sp) in SHAPES.items())
    checks = " ".join(  # (the CTAs per SM of the launch bound do not change the algorithm)
        f"static_assert(Config<{h}, {w}>::S::X == {SHAPES[h, w][0]} && Config<{h}, {w}>::S::P == {SHAPES[h, w][1]} && "
        f"Config<{h}, {w}>::S::CS == {SHAPES[h, w][2]} && "
        f"Config<{h}, {w}>::S::kind == {'Fft::kSplit' if SHAPES[h, w][3] else 'Fft::kBlock'});" for h, w in CONFIG)
    (d / "harness.cpp").write_text(_HARNESS.replace("SGS_SHAPES", shapes).replace("SGS_CONFIG_CHECKS", checks))
    exe = d / "harness"
    cmd = [cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", f"-I{CSRC}",
           "-pthread", str(d / "harness.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"dx host emulation build failed:\n{proc.stderr[-8000:]}"
    return exe


def _emulate(exe, tmp_path, grads, assign, hw_config, params, mask="hard", reverse=False, grid=2):
    """The update and the four diagnostic sums as the dx kernel computes them, run by `grid`
    clusters (each does plane groups c, c + grid, ...)."""
    D, N, C, H, W = grads.shape
    X, P, CS, split = hw_config
    head = np.array([H, W, X, P, CS, int(split), D, N, C, mask == "soft", reverse, grid], dtype=np.int64)
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        f.write(head.tobytes())
        f.write(np.array(params, dtype=np.float64).tobytes())
        f.write(assign.numpy().astype(np.int64).tobytes())
        f.write(grads.numpy().astype(np.float64).tobytes())
    proc = subprocess.run([str(exe), str(inp), str(outp)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = torch.from_numpy(np.frombuffer(outp.read_bytes(), dtype=np.float64).copy())
    return out[:-4].reshape(N, C, H, W), out[-4:]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _check(got, stats, grads, assign, params, mask):
    ref, _, _, _, ref_stats = sgs_reference(grads, assign, *params, mask, return_parts=True)
    assert _rel(got, ref) < 1e-5
    planes = grads.shape[1] * grads.shape[2]
    assert stats[1].item() == ref_stats[1].item()  # every half-spectrum component counted once
    # the reference may count the rounding noise of a self-conjugate bin's Im (4 per plane)
    assert abs(stats[0].item() - ref_stats[0].item()) <= 4 * planes, (stats, ref_stats)
    for q in (2, 3):
        assert abs(stats[q].item() - ref_stats[q].item()) <= 1e-5 * ref_stats[3].item(), (q, stats, ref_stats)


@pytest.mark.parametrize("hw", list(SHAPES), ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mask", ["hard", "soft"])
def test_dx_block_algorithm_matches_reference(harness, tmp_path, hw, mask):
    H, W = hw
    D, N, C = 3, 3, 2  # 6 planes over 2 clusters: ragged groups, several groups per cluster, idle ones
    params = (1.0, 0.25, 1.0, 0.5)
    grads = separated_grads(D, N, C, H, W, rho=params[1], seed=H * 1000 + W)
    assign = torch.tensor([2, 0, 1])
    got, stats = _emulate(harness, tmp_path, grads, assign, SHAPES[hw], params, mask=mask, reverse=(H + W) % 3 == 0)
    _check(got, stats, grads, assign, params, mask)


@pytest.mark.parametrize("hw", [(32, 32), (128, 64), (16, 8), (28, 28)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dx_grid_size_does_not_matter(harness, tmp_path, hw):
    """One cluster doing every plane group, or more clusters than groups: the same update bit for
    bit (the prefetch chain across groups), the same sums up to their order; CTAs in reverse."""
    H, W = hw
    grads = separated_grads(2, 5, 1, H, W, seed=H + W)
    assign = torch.tensor([1, 0, 1, 1, 0])
    params = (1.0, 0.25, 1.0, 0.5)
    base, base_stats = _emulate(harness, tmp_path, grads, assign, SHAPES[hw], params, grid=2)
    for grid in (1, 7):
        got, stats = _emulate(harness, tmp_path, grads, assign, SHAPES[hw], params, grid=grid, reverse=True)
        assert torch.equal(got, base), grid
        assert torch.allclose(stats, base_stats, rtol=1e-12, atol=0), grid
    _check(base, base_stats, grads, assign, params, "hard")


@pytest.mark.parametrize("tau,rho", [(2 / 3, 0.0), (1.0, 0.6), (0.0, 0.25)])
@pytest.mark.parametrize("hw", [(32, 32), (128, 128)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dx_thresholds(harness, tmp_path, tau, rho, hw):
    """Other thresholds, D = 4, every image assigned a different domain."""
    grads = separated_grads(4, 4, 1, *hw, rho=rho, seed=7)
    assign = torch.tensor([3, 1, 0, 2])
    params = (tau, rho, 0.5, 1.5)
    got, stats = _emulate(harness, tmp_path, grads, assign, SHAPES[hw], params)
    _check(got, stats, grads, assign, params, "hard")


@pytest.mark.parametrize("hw", [(32, 32), (28, 28), (128, 128)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dx_single_domain(harness, tmp_path, hw):
    grads = separated_grads(1, 2, 1, *hw, seed=3)
    assign = torch.zeros(2, dtype=torch.long)
    params = (1.0, 0.25, 1.0, 0.25)
    got, stats = _emulate(harness, tmp_path, grads, assign, SHAPES[hw], params)
    _check(got, stats, grads, assign, params, "hard")
