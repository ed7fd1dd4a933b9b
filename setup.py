"""Packaging. Metadata lives in pyproject.toml; this file adds what needs code:

* the C++/CUDA sources are installed inside the package (``sgs_cuda/_csrc``) so that a
  non-editable install can still JIT-build the extension on first use;
* ``SGS_BUILD_EXT=1 pip install --no-build-isolation .`` builds the extension ahead of time as
  ``sgs_cuda._C`` (with CUDA when torch has it and nvcc is found), so no compiler is needed later.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "sgs_cuda" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in CSRC.iterdir():
            if source.suffix in (".h", ".cpp", ".cu", ".cuh"):
                shutil.copy2(source, target / source.name)


def extension_modules():
    if os.environ.get("SGS_BUILD_EXT") != "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

    sys.path.insert(0, str(ROOT))
    from sgs_cuda._build import DX_SOURCES, mathdx_include  # noqa: E402

    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    mathdx = mathdx_include() if with_cuda else None
    sources = ["csrc/bindings.cpp", "csrc/sgs_cpu.cpp"] + (["csrc/sgs_cuda.cu"] if with_cuda else [])
    sources += [f"csrc/{s}" for s in DX_SOURCES] if mathdx else []
    defines = ["-DSGS_PYTHON_MODULE"] + (["-DSGS_WITH_CUDA"] if with_cuda else []) + (["-DSGS_WITH_DX"] if mathdx else [])
    extra = {"cxx": ["-O3", "-fopenmp", "-ffp-contract=fast"] + defines}
    if with_cuda:
        extra["nvcc"] = ["-O3"] + defines
    kind = CUDAExtension if with_cuda else CppExtension
    ext = kind("sgs_cuda._C", sources, include_dirs=[str(CSRC)] + ([str(mathdx)] if mathdx else []), extra_compile_args=extra,
               extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, ext_cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **ext_cmdclass})
