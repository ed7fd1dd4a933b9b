"""The CUDA kernels of sgs::surgery: they compile, and their algorithm is right.

* ``test_cuda_extension_builds_and_imports`` compiles bindings.cpp + sgs_cpu.cpp + sgs_cuda.cu
  with ``-DSGS_WITH_CUDA`` in a fresh interpreter (an op library registers once per process) and
  imports it. It needs CUDA torch and nvcc, not a GPU, so CI compiles the CUDA sources on every
  run. Where a GPU is present the same subprocess also runs the CUDA op against the float64
  reference on the portable and cuFFT paths (fused, fused on a thread-block cluster, cuFFT
  fallback); tests/test_cuda_paths.py covers the whole ladder, the cuFFTDx kernel included.
* ``test_fused_kernel_emulated_*`` compile csrc/sgs_cuda.cu with ``-DSGS_EMULATE`` as plain C++
  (no torch, no CUDA): the shared-memory planner and the block-level algorithm of the fused
  kernel (every index, buffer alias and cluster exchange) run on the host, one std::thread per CTA
  of a cluster, work items in forward and reverse order, shared memory poisoned with NaN, and are
  compared with the float64 reference. They need only g++.
"""
from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sgs_cuda.reference import sgs_reference

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
H100_SMEM = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on H100/H200 (227 KB)


def _nvcc_available() -> bool:
    try:
        from torch.utils import cpp_extension
    except Exception:  # pragma: no cover
        return False
    home = cpp_extension.CUDA_HOME or ("/usr/local/cuda" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    return home is not None and (Path(home) / "bin" / "nvcc").exists()


# --------------------------------------------------------------------------------------------
# 1. The CUDA build (and, with a GPU, the CUDA op)
# --------------------------------------------------------------------------------------------

_BUILD_AND_RUN = textwrap.dedent(r"""
    import os, sys, time
    import torch
    from sgs_cuda import _build
    t0 = time.time()
    _build.build_extension(with_cuda=True, build_dir=sys.argv[1] or None, verbose=False)
    print(f"built in {time.time() - t0:.0f} s")
    assert torch.ops.sgs.cuda_enabled(), "extension built without SGS_WITH_CUDA"
    if not torch.cuda.is_available():
        print("no GPU: build and import only")
        sys.exit(0)

    from sgs_cuda.reference import sgs_reference
    #BOUNDARY_FREE_GRADS#
    torch.manual_seed(0)
    dev = "cuda"

    def check(shape, dtype=torch.float64, path="auto", smem=None, parts=True, mask="hard"):
        # float64: random inputs, 1e-9. float32: inputs away from the mask's decision boundaries.
        torch.ops.sgs.set_cuda_options(path, -1 if smem is None else smem)
        D, N = shape[:2]
        if dtype == torch.float64:
            g, tol, args = torch.randn(shape, dtype=torch.float64, device=dev), 1e-9, (0.9, 0.25, 1.0, 0.5, mask)
        else:
            g, tol, args = _boundary_free_grads(*shape).to(dev), 2e-5, (1.0, 0.25, 1.0, 0.5, mask)
        a = torch.randint(0, D, (N,), device=dev)
        ref = sgs_reference(g, a, *args, return_parts=True)
        if parts:
            out = torch.ops.sgs.surgery_parts(g.to(dtype), a, *args)
        else:
            out = (torch.ops.sgs.surgery(g.to(dtype), a, *args),)
        for name, o, r in zip(("update", "mean", "shared", "diversity"), out, ref):
            assert o.dtype == dtype and o.shape == r.shape and o.is_cuda, (name, o.dtype, o.shape)
            err = ((o.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
            assert err < tol, f"{shape} {dtype} {path} smem={smem} {mask} {name}: rel err {err:.2e}"
        if parts:  # and the update with the sums alone (sgs::surgery_stats: the dx kernel where it applies)
            up2, st2 = torch.ops.sgs.surgery_stats(g.to(dtype), a, *args)
            err = ((up2.double() - ref[0]).abs().max() / ref[0].abs().max().clamp_min(1e-30)).item()
            assert up2.dtype == dtype and err < tol, f"{shape} {dtype} {path} surgery_stats update: rel err {err:.2e}"
            for st, rs in ((out[4], ref[4]), (st2, ref[4])):
                assert st.dtype == torch.float64 and st.is_cuda and st.shape == (4,)
                assert st[1].item() == rs[1].item(), (st, rs)
                # a self-conjugate Im component may be counted by the reference (rounding noise)
                assert abs(st[0].item() - rs[0].item()) <= 4 * shape[1] * shape[2], (st, rs)
                assert abs(st[2].item() - rs[2].item()) <= 1e-5 * rs[3].item(), (st, rs)
                assert abs(st[3].item() - rs[3].item()) <= 1e-5 * rs[3].item(), (st, rs)
        print("ok", shape, dtype, path, smem, mask, flush=True)

    for shape in [(3, 4, 3, 32, 32), (4, 2, 3, 64, 64), (3, 2, 2, 28, 28), (4, 2, 2, 128, 128),
                  (2, 3, 1, 32, 64), (3, 2, 1, 64, 28), (1, 3, 2, 16, 16), (3, 2, 2, 15, 12)]:
        check(shape)
        check(shape, path="fallback")
    check((4, 2, 2, 128, 128), path="fused")         # float64 128x128: cluster of 4 CTAs
    check((3, 2, 2, 64, 64), smem=48 * 1024)          # float64 64x64 in 48 KB: a cluster of 4
    check((3, 2, 2, 32, 32), smem=10 * 1024)          # cluster of 8 forced at 32x32
    check((3, 2, 3, 33, 30), path="fallback")          # odd H
    check((3, 2, 3, 32, 31))                           # odd W: fallback
    check((3, 4, 3, 32, 32), parts=False)
    check((3, 4, 3, 32, 32), mask="soft")
    for shape in [(3, 4, 3, 32, 32), (4, 2, 3, 64, 64), (3, 2, 3, 28, 28), (4, 2, 3, 128, 128)]:
        for mask in ("hard", "soft"):
            check(shape, dtype=torch.float32, mask=mask)   # fused; 128x128 on a 2-CTA cluster
        check(shape, dtype=torch.float32, path="fallback")
    torch.ops.sgs.set_cuda_options("auto", -1)
    # float16/bfloat16: loaded exactly into float32, computed as float32, rounded once at the end
    for dt in (torch.float16, torch.bfloat16):
        for shape in [(3, 2, 3, 32, 32), (3, 1, 2, 128, 128), (3, 2, 1, 32, 31)]:
            g = torch.randn(shape, device=dev).to(dt)
            a = torch.randint(0, shape[0], (shape[1],), device=dev)
            u = torch.ops.sgs.surgery(g, a, 1.0, 0.25, 1.0, 0.25, "hard")
            u32 = torch.ops.sgs.surgery(g.float(), a, 1.0, 0.25, 1.0, 0.25, "hard")
            assert u.dtype == dt and torch.equal(u, u32.to(dt)), (dt, shape)
    # N = 0
    e = torch.ops.sgs.surgery(torch.zeros(3, 0, 3, 32, 32, device=dev), torch.zeros(0, dtype=torch.long, device=dev),
                              1.0, 0.25, 1.0, 0.25, "hard")
    assert e.shape == (0, 3, 32, 32)
    # CUDA graph capture of the fused path (no host synchronisation inside)
    g = torch.randn(3, 8, 3, 32, 32, device=dev)
    a = torch.randint(0, 3, (8,), device=dev)
    eager = torch.ops.sgs.surgery(g, a, 1.0, 0.25, 1.0, 0.25, "hard")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ops.sgs.surgery(g, a, 1.0, 0.25, 1.0, 0.25, "hard")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.sgs.surgery(g, a, 1.0, 0.25, 1.0, 0.25, "hard")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    print("GPU checks passed")
""")


@pytest.mark.skipif(torch.version.cuda is None, reason="torch has no CUDA")
@pytest.mark.skipif(not _nvcc_available(), reason="nvcc not found")
def test_cuda_extension_builds_and_imports(tmp_path):
    # The default build folder is the shared cache (SGS_CACHE_DIR): when this session's extension
    # already compiled the same sources with CUDA, the subprocess only loads it. An explicit
    # SGS_CUDA_TEST_BUILD_DIR (benchmarks/gpu_check.sh) works the same way.
    build_dir = os.environ.get("SGS_CUDA_TEST_BUILD_DIR", "")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = _BUILD_AND_RUN.replace("#BOUNDARY_FREE_GRADS#\n", inspect.getsource(_boundary_free_grads))
    assert "#BOUNDARY_FREE_GRADS#" not in script
    proc = subprocess.run([sys.executable, "-c", script, build_dir], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, f"CUDA build/run failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-12000:]}"


# --------------------------------------------------------------------------------------------
# 2. The fused kernel's algorithm, emulated on the host
# --------------------------------------------------------------------------------------------

_HARNESS = r"""
#define SGS_EMULATE 1
#include "sgs_cuda.cu"

#include <condition_variable>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

using namespace sgs;
using namespace sgs::cuda_detail;

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lk(mu_);
    const long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lk, [&] { return gen != gen_; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  long gen_ = 0;
};

// One CTA: all its threads' work items of a phase run in a loop (forward or reverse order).
struct HostCtx {
  int rank;
  unsigned char** smems;
  int64_t smem_bytes;
  Barrier* bar;
  bool reverse;
  void sync() {}
  void cluster_sync() { bar->wait(); }
  template <class F>
  void for_each(int count, F&& f) {
    if (reverse)
      for (int i = count - 1; i >= 0; --i) f(i);
    else
      for (int i = 0; i < count; ++i) f(i);
  }
  template <typename P>
  P* remote(P* p, int r) {
    const std::ptrdiff_t off = reinterpret_cast<const unsigned char*>(p) - smems[rank];
    if (off < 0 || off >= smem_bytes) {
      std::fprintf(stderr, "remote(): pointer outside shared memory\n");
      std::abort();
    }
    return reinterpret_cast<P*>(smems[r] + off);
  }
  bool leader() const { return true; }
  void reduce_sum4(double*) {}
};

static void rd(void* p, size_t n, FILE* f) {
  if (std::fread(p, 1, n, f) != n) { std::fprintf(stderr, "short read\n"); std::exit(2); }
}
static void wr_doubles(const std::vector<double>& v, FILE* f) { std::fwrite(v.data(), sizeof(double), v.size(), f); }

template <typename T>
int run(const int64_t* h, const double* prm, FILE* in, FILE* out) {
  const int64_t mode = h[0], D = h[2], N = h[3], C = h[4], H = h[5], W = h[6];
  const bool soft = h[7] != 0, parts = h[8] != 0, reverse = h[11] != 0, sums = parts || h[12] != 0;
  const SurgeryParams<T> p = make_params<T>(static_cast<int>(D), prm[0], prm[1], prm[2], prm[3], soft);
  std::vector<int64_t> assign(N);
  rd(assign.data(), sizeof(int64_t) * N, in);
  const int64_t planes = N * C;
  if (mode == 1) {  // fallback bins function over a given spectrum [D, N, C, H, Wr] complex
    const int64_t Wr = W / 2 + 1, nb = planes * H * Wr;
    std::vector<double> spec_d(D * nb * 2);
    rd(spec_d.data(), sizeof(double) * spec_d.size(), in);
    std::vector<T> spec(spec_d.begin(), spec_d.end()), upd(nb * 2), sh(nb * 2), dv(nb * 2);
    BinsArgs<T> a;
    a.spec = spec.data(), a.assign = assign.data(), a.upd = upd.data(), a.sh = sh.data(), a.dv = dv.data();
    a.block_stats = nullptr, a.nb = nb, a.per_image = C * H * Wr;
    a.H = static_cast<int>(H), a.W = static_cast<int>(W), a.Wr = static_cast<int>(Wr), a.domains = static_cast<int>(D);
    a.parts = parts, a.sums = sums, a.p = p;
    double acc[4] = {0, 0, 0, 0};
    for (int64_t b = 0; b < nb; ++b) recombine_spectra_bin(a, b, acc);
    const int64_t hdr[4] = {1, 1, 0, 0};
    std::fwrite(hdr, sizeof(int64_t), 4, out);
    wr_doubles(std::vector<double>(upd.begin(), upd.end()), out);
    wr_doubles(std::vector<double>(sh.begin(), sh.end()), out);
    wr_doubles(std::vector<double>(dv.begin(), dv.end()), out);
    wr_doubles(std::vector<double>(acc, acc + 4), out);
    return 0;
  }
  const FusedPlan plan = plan_fused(static_cast<int>(H), static_cast<int>(W), D, sizeof(T), h[9], static_cast<int>(h[10]));
  const int64_t hdr[4] = {plan.ok, plan.cs, plan.threads, plan.smem};
  std::fwrite(hdr, sizeof(int64_t), 4, out);
  if (!plan.ok || mode == 2) return 0;
  const int64_t pe = H * W;
  std::vector<double> g_d(D * planes * pe);
  rd(g_d.data(), sizeof(double) * g_d.size(), in);
  std::vector<T> g(g_d.begin(), g_d.end());
  const T poison = std::nan("");
  std::vector<T> upd(planes * pe, poison), sh(planes * pe, poison), dv(planes * pe, poison);
  std::vector<double> ps(planes * plan.cs * 4, std::nan(""));
  FusedArgs<T, T> a;
  a.grads = g.data(), a.assign = assign.data(), a.update = upd.data();
  a.shared = parts ? sh.data() : nullptr, a.diversity = parts ? dv.data() : nullptr;
  a.plane_stats = sums ? ps.data() : nullptr;
  a.planes = planes, a.channels = C, a.domains = static_cast<int>(D), a.parts = parts, a.sums = sums, a.p = p;
  a.plan = plan;
  a.rows = make_plan(plan.M), a.cols = make_plan(plan.H);
  std::vector<std::vector<unsigned char>> mem(plan.cs, std::vector<unsigned char>(plan.smem));
  std::vector<unsigned char*> ptrs(plan.cs);
  for (int r = 0; r < plan.cs; ++r) ptrs[r] = mem[r].data();
  for (int64_t pl = 0; pl < planes; ++pl) {
    for (auto& m : mem) std::memset(m.data(), 0xff, m.size());  // NaN in every float/double slot
    Barrier bar(plan.cs);
    std::vector<std::thread> cta;
    for (int r = 0; r < plan.cs; ++r)
      cta.emplace_back([&, r] {
        HostCtx ctx{r, ptrs.data(), plan.smem, &bar, reverse};
        fused_plane(ctx, a, ptrs[r], pl, r);
      });
    for (auto& t : cta) t.join();
  }
  wr_doubles(std::vector<double>(upd.begin(), upd.end()), out);
  wr_doubles(std::vector<double>(sh.begin(), sh.end()), out);
  wr_doubles(std::vector<double>(dv.begin(), dv.end()), out);
  double st[4] = {0, 0, 0, 0};
  if (sums)
    for (int64_t i = 0; i < planes * plan.cs; ++i)
      for (int q = 0; q < 4; ++q) st[q] += ps[i * 4 + q];
  wr_doubles(std::vector<double>(st, st + 4), out);
  return 0;
}

// make_params: the integer sign-count threshold kstar gives exactly the reference's decision
// T(k)/T(D) >= T(tau) for every level k, and equal magnitudes are kept at rho = 1 (no division
// or square root is involved in the hard mask any more, so the device's precision cannot matter).
template <typename T>
int check_thresholds() {
  int bad = 0, checked = 0;
  for (int D = 1; D <= 40; ++D) {
    std::vector<double> taus = {0.0, 1.0, 0.5, 0.9, 0.25, 1.0 - 1e-12, 1e-12};
    for (int k = 0; k <= D; ++k) {
      const double lv = static_cast<double>(k) / D;
      for (double e : {0.0, 1e-15, -1e-15, 1e-7, -1e-7, 3e-8, -3e-8}) taus.push_back(lv + e);
    }
    for (double tau : taus) {
      if (tau < 0.0 || tau > 1.0) continue;
      const SurgeryParams<T> p = make_params<T>(D, tau, 0.25, 1.0, 0.25, false);
      for (int k = 0; k <= D; ++k) {
        volatile T level = static_cast<T>(k) / static_cast<T>(D);
        ++checked;
        if ((level >= static_cast<T>(tau)) != (k >= p.kstar)) ++bad;
      }
    }
  }
  const SurgeryParams<T> p = make_params<T>(3, 1.0, 1.0, 1.0, 0.25, false);
  BinStats<T> s{};
  stats_first(s, T(0.3), T(-0.7));
  stats_add(s, T(-0.7), T(0.3));  // same magnitude, other components
  stats_add(s, T(0.3), T(-0.7));
  const BinResult<T> r = recombine_bin(p, s, T(0.3), T(-0.7));
  if (r.mask_re != T(0) || r.mask_im != T(0)) ++bad;  // signs disagree: nothing kept
  stats_first(s, T(0.3), T(-0.7));
  stats_add(s, T(0.3), T(-0.7));
  stats_add(s, T(0.3), T(-0.7));
  if (recombine_bin(p, s, T(0.3), T(-0.7)).mask_re != T(1)) ++bad;  // m = 1 exactly, kept at rho = 1
  std::printf("thresholds<%s>: %d checked, %d wrong\n", sizeof(T) == 4 ? "float" : "double", checked, bad);
  return bad;
}

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "thresholds") == 0)
    return check_thresholds<float>() + check_thresholds<double>() == 0 ? 0 : 1;
  if (argc != 3) return 2;
  FILE* in = std::fopen(argv[1], "rb");
  FILE* out = std::fopen(argv[2], "wb");
  if (!in || !out) return 2;
  int64_t h[13];
  double prm[4];
  rd(h, sizeof(h), in);
  rd(prm, sizeof(prm), in);
  const int rc = h[1] == 1 ? run<double>(h, prm, in, out) : run<float>(h, prm, in, out);
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
    d = tmp_path_factory.mktemp("sgs_emulate")
    src = d / "harness.cpp"
    src.write_text(_HARNESS)
    exe = d / "harness"
    cmd = [cxx, "-std=c++17", "-O2", "-fopenmp-simd", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
           f"-I{CSRC}", "-pthread", str(src), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"host emulation build failed:\n{proc.stderr[-8000:]}"
    return exe


def _run_harness(exe, tmp_path, mode, dtype, data, assign, D, N, C, H, W, mask="hard", parts=True,
                 smem=H100_SMEM, max_cluster=8, reverse=False, params=(0.9, 0.25, 1.0, 0.5), sums=False):
    head = np.array([mode, 1 if dtype == torch.float64 else 0, D, N, C, H, W, mask == "soft", parts, smem,
                     max_cluster, reverse, sums], dtype=np.int64)
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        f.write(head.tobytes())
        f.write(np.array(params, dtype=np.float64).tobytes())
        f.write(assign.numpy().astype(np.int64).tobytes())
        if data is not None:
            f.write(data.numpy().astype(np.float64).tobytes())
    proc = subprocess.run([str(exe), str(inp), str(outp)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    raw = outp.read_bytes()
    hdr = np.frombuffer(raw[:32], dtype=np.int64)
    vals = torch.from_numpy(np.frombuffer(raw[32:], dtype=np.float64).copy())
    return hdr, vals


def _plan(exe, tmp_path, H, W, D=4, dtype=torch.float32, smem=H100_SMEM, max_cluster=8):
    hdr, _ = _run_harness(exe, tmp_path, 2, dtype, None, torch.zeros(0, dtype=torch.long), D, 0, 1, H, W,
                          smem=smem, max_cluster=max_cluster)
    return dict(ok=int(hdr[0]), cs=int(hdr[1]), threads=int(hdr[2]), smem=int(hdr[3]))


def _emulate(exe, tmp_path, grads, assign, dtype, **kw):
    D, N, C, H, W = grads.shape
    hdr, vals = _run_harness(exe, tmp_path, 0, dtype, grads, assign, D, N, C, H, W, **kw)
    assert hdr[0] == 1, "the planner refused this size"
    n = N * C * H * W
    out = [vals[i * n:(i + 1) * n].reshape(N, C, H, W) for i in range(3)]
    return out + [vals[3 * n:3 * n + 4]], dict(cs=int(hdr[1]), threads=int(hdr[2]), smem=int(hdr[3]))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _boundary_free_grads(D, N, C, H, W, seed=0):
    """float64 domain gradients whose spectra stay away from every hard-mask decision boundary:
    |Re|, |Im| >= 0.5 with random signs, and per bin either nearly equal magnitudes across domains
    (ratio >= 0.8) or one dominant domain (ratio <= 0.06), Hermitian-consistent on the
    self-conjugate columns so that irfft2 -> rfft2 returns the same values."""
    gen = torch.Generator().manual_seed(seed)
    Wr = W // 2 + 1
    shape = (D, N, C, H, Wr)

    def comp():
        return (0.5 + 0.5 * torch.rand(shape, generator=gen, dtype=torch.float64)) * \
            torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).double()

    spec = torch.complex(comp(), comp())
    scale = 1.0 + 0.1 * torch.rand(shape, generator=gen, dtype=torch.float64)
    dominated = torch.rand((1, N, C, H, Wr), generator=gen) < 0.3
    boost = torch.zeros(shape, dtype=torch.bool)
    boost[0] = True
    scale = torch.where(dominated & boost, scale * 30.0, scale)
    spec = spec * scale
    cols = [0] + ([W // 2] if W % 2 == 0 else [])
    for k in cols:
        col = spec[..., k].clone()
        for h in range(1, H):
            if h > H - h:
                col[..., h] = col[..., H - h].conj()
        self_rows = [0] + ([H // 2] if H % 2 == 0 else [])
        for h in self_rows:
            col[..., h] = col[..., h].real.to(torch.complex128)
        spec[..., k] = col
    return torch.fft.irfft2(spec, s=(H, W))


EMULATED_F64 = [
    # (D, N, C, H, W), smem budget, max cluster, reverse order, expected cluster size
    ((3, 2, 2, 32, 32), H100_SMEM, 8, False, 1),
    ((4, 1, 2, 64, 64), H100_SMEM, 8, True, 1),
    ((3, 2, 1, 28, 28), H100_SMEM, 8, False, 1),
    ((4, 1, 1, 128, 128), H100_SMEM, 8, False, 4),   # float64 128x128: cluster of 4
    ((2, 2, 1, 32, 64), H100_SMEM, 8, True, 1),
    ((3, 1, 2, 64, 28), H100_SMEM, 8, False, 1),
    ((3, 2, 1, 15, 12), H100_SMEM, 8, False, 1),     # odd H, radix 3 and 5
    ((1, 2, 2, 8, 8), H100_SMEM, 8, False, 1),       # D = 1
    ((5, 3, 1, 2, 2), H100_SMEM, 8, False, 1),       # M = 1: no row stages
    ((3, 2, 1, 1, 6), H100_SMEM, 8, True, 1),        # H = 1: no column stages
    ((3, 2, 2, 32, 32), 40 * 1024, 8, False, 2),     # forced cluster of 2
    ((3, 2, 2, 32, 32), 24 * 1024, 8, True, 4),      # forced cluster of 4
    ((3, 1, 1, 24, 20), 10 * 1024, 8, False, None),  # cluster with ragged row/column split
    ((2, 1, 1, 16, 18), 4800, 8, False, 8),          # cluster of 8, CTAs own 1 or 2 columns
]


@pytest.mark.parametrize("shape,smem,max_cluster,reverse,cs", EMULATED_F64)
@pytest.mark.parametrize("mask", ["hard", "soft"])
def test_fused_kernel_emulated_float64(harness, tmp_path, shape, smem, max_cluster, reverse, cs, mask):
    D, N = shape[:2]
    torch.manual_seed(hash((shape, smem, mask)) % 2**31)
    grads = torch.randn(shape, dtype=torch.float64)
    assign = torch.randint(0, D, (N,))
    (upd, sh, dv, stats), info = _emulate(harness, tmp_path, grads, assign, torch.float64, mask=mask, smem=smem,
                                          max_cluster=max_cluster, reverse=reverse)
    assert info["smem"] <= smem
    assert cs is None or info["cs"] == cs, info
    if smem < H100_SMEM:
        assert info["cs"] > 1, info
    ref = sgs_reference(grads, assign, 0.9, 0.25, 1.0, 0.5, mask, return_parts=True)
    assert _rel(upd, ref[0]) < 1e-10
    assert _rel(sh, ref[2]) < 1e-10
    assert _rel(dv, ref[3]) < 1e-10 or ref[3].abs().max() == 0
    assert stats[1].item() == ref[4][1].item()
    # a self-conjugate Im component is exactly 0 here, rounding noise in the reference
    assert abs(stats[0].item() - ref[4][0].item()) <= 4 * shape[1] * shape[2]
    assert abs(stats[2].item() - ref[4][2].item()) <= 1e-9 * max(ref[4][2].item(), 1e-300)
    assert abs(stats[3].item() - ref[4][3].item()) <= 1e-9 * ref[4][3].item()


@pytest.mark.parametrize("smem", [H100_SMEM, 24 * 1024], ids=["one-cta", "cluster"])
def test_fused_kernel_emulated_sums_only(harness, tmp_path, smem):
    """sgs::surgery_stats on the portable kernel: the update and the four sums, no parts written."""
    grads = torch.randn(3, 2, 2, 32, 32, dtype=torch.float64)
    assign = torch.tensor([2, 0])
    (upd, sh, dv, stats), _ = _emulate(harness, tmp_path, grads, assign, torch.float64, parts=False, sums=True,
                                       smem=smem)
    ref = sgs_reference(grads, assign, 0.9, 0.25, 1.0, 0.5, "hard", return_parts=True)
    assert _rel(upd, ref[0]) < 1e-10
    assert torch.isnan(sh).all() and torch.isnan(dv).all()  # (poisoned, never written)
    assert stats[1].item() == ref[4][1].item()
    assert abs(stats[0].item() - ref[4][0].item()) <= 4 * 2 * 2
    for q in (2, 3):
        assert abs(stats[q].item() - ref[4][q].item()) <= 1e-9 * ref[4][3].item()


def test_fused_kernel_emulated_no_parts(harness, tmp_path):
    grads = torch.randn(3, 2, 2, 32, 32, dtype=torch.float64)
    assign = torch.tensor([2, 0])
    (upd, _, _, _), _ = _emulate(harness, tmp_path, grads, assign, torch.float64, parts=False, smem=24 * 1024)
    ref = sgs_reference(grads, assign, 0.9, 0.25, 1.0, 0.5, "hard")
    assert _rel(upd, ref) < 1e-10


@pytest.mark.parametrize("shape", [(3, 2, 2, 32, 32), (4, 1, 3, 64, 64), (3, 1, 1, 28, 28), (4, 1, 1, 128, 128),
                                   (3, 2, 1, 64, 32)])
def test_fused_kernel_emulated_float32(harness, tmp_path, shape):
    """float32 layout (other shared-memory offsets, 128x128 on a 2-CTA cluster) on inputs whose
    hard-mask decisions cannot flip between float32 and float64."""
    D, N = shape[:2]
    grads = _boundary_free_grads(*shape)
    assign = torch.arange(N) % D
    (upd, sh, dv, stats), info = _emulate(harness, tmp_path, grads, assign, torch.float32, params=(1.0, 0.25, 1.0, 0.5))
    if shape[3] == 128:
        assert info["cs"] == 2
    ref = sgs_reference(grads, assign, 1.0, 0.25, 1.0, 0.5, "hard", return_parts=True)
    assert _rel(upd, ref[0]) < 2e-5
    assert _rel(sh, ref[2]) < 2e-5
    assert _rel(dv, ref[3]) < 2e-5
    # the hard mask is identical: same kept-component count up to self-conjugate Im components
    assert abs(stats[0].item() - ref[4][0].item()) <= 4 * shape[1] * shape[2]


@pytest.mark.parametrize("shape", [(3, 2, 2, 32, 32), (4, 2, 1, 15, 9), (1, 2, 1, 8, 8)])
def test_fallback_bins_emulated(harness, tmp_path, shape):
    """The per-bin kernel of the cuFFT fallback path, given the spectra."""
    D, N, C, H, W = shape
    grads = torch.randn(shape, dtype=torch.float64)
    assign = torch.randint(0, D, (N,))
    spec = torch.fft.rfft2(grads)
    hdr, vals = _run_harness(harness, tmp_path, 1, torch.float64, torch.view_as_real(spec).contiguous(), assign,
                             D, N, C, H, W)
    nb = N * C * H * (W // 2 + 1)
    parts = [torch.view_as_complex(vals[i * 2 * nb:(i + 1) * 2 * nb].reshape(N, C, H, W // 2 + 1, 2))
             for i in range(3)]
    ref = sgs_reference(grads, assign, 0.9, 0.25, 1.0, 0.5, "hard", return_parts=True)
    assert _rel(torch.fft.irfft2(parts[0], s=(H, W)), ref[0]) < 1e-10
    assert _rel(torch.fft.irfft2(parts[1], s=(H, W)), ref[2]) < 1e-10
    stats = vals[6 * nb:6 * nb + 4]
    assert stats[1].item() == ref[4][1].item()


def test_hard_mask_thresholds_are_exact(harness):
    """The hard mask's integer sign-count threshold reproduces the reference's decision at every
    agreement level, and equal magnitudes stay kept at rho = 1."""
    proc = subprocess.run([str(harness), "thresholds"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("tau", [1.0, 2 / 3, 1 / 3, 0.0])
def test_fused_kernel_emulated_exact_tau_levels(harness, tmp_path, tau):
    """tau exactly at an agreement level k/D keeps that level, as the reference does."""
    grads = torch.randn(3, 2, 2, 16, 16, dtype=torch.float64)
    assign = torch.tensor([1, 2])
    params = (tau, 0.25, 1.0, 0.5)
    (upd, sh, _, stats), _ = _emulate(harness, tmp_path, grads, assign, torch.float64, params=params)
    ref = sgs_reference(grads, assign, *params, "hard", return_parts=True)
    assert _rel(upd, ref[0]) < 1e-10
    assert _rel(sh, ref[2]) < 1e-10 or ref[2].abs().max() == 0


def test_fused_plan_shared_memory(harness, tmp_path):
    """The fused path holds the sizes the project uses within an H100's 227 KB per block."""
    expect = {28: 1, 32: 1, 64: 1, 128: 2}
    for n, cs in expect.items():
        p = _plan(harness, tmp_path, n, n)
        assert p["ok"] and p["cs"] == cs and p["smem"] <= H100_SMEM, (n, p)
        assert p["threads"] % 32 == 0 and 64 <= p["threads"] <= 512
    for H, W in [(32, 64), (64, 32), (28, 32), (128, 64), (64, 128), (96, 96), (128, 128)]:
        p = _plan(harness, tmp_path, H, W)
        assert p["ok"] and p["smem"] <= H100_SMEM, (H, W, p)
    assert _plan(harness, tmp_path, 64, 64, dtype=torch.float64)["cs"] == 1
    assert _plan(harness, tmp_path, 128, 128, dtype=torch.float64)["cs"] == 4
    assert _plan(harness, tmp_path, 128, 128, max_cluster=1)["ok"] == 0   # no clusters: fallback
    assert _plan(harness, tmp_path, 32, 31)["ok"] == 0                   # odd W: fallback
    assert _plan(harness, tmp_path, 32, 32, D=128)["ok"] == 0            # int8 sign counts
    assert _plan(harness, tmp_path, 34, 32)["ok"] == 0                   # prime factor 17
