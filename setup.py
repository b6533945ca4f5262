"""Package build. Metadata and dependencies live in setup.cfg.

Also builds the optional compiled dispatch extension `moe._C` (moe/csrc/) with
torch.utils.cpp_extension:

- CppExtension (C++ CPU kernels, -O3, OpenMP) by default;
- CUDAExtension (adds moe/csrc/dispatch_cuda.cpp + dispatch_kernels.cu) when the installed torch is
  a CUDA build (torch.version.cuda) and a CUDA toolkit is found (CUDA_HOME / nvcc). A GPU is not
  needed at build time.

The extension is optional: when torch is not importable at build time (use
`pip install --no-build-isolation -e .`), no C++ compiler is found, or the compilation fails, the
install still succeeds, prints one warning, and `moe.ops` falls back to the PyTorch reference
(`dispatch_backend("auto")` -> "reference"). Environment knobs:

- MOE_BUILD_EXT=0   skip the extension;
- MOE_BUILD_CUDA=0  build the CPU extension even with a CUDA torch (=1 insists on CUDA);
- MAX_JOBS=N        parallel compile jobs (ninja), as for any torch extension.
"""
import os
import sys
import time

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("moe", "csrc")
EXT_NAME = "moe._C"


def _warn(reason):
    bar = "=" * 100
    sys.stderr.write(
        f"\n{bar}\nWARNING: the compiled dispatch extension {EXT_NAME} was NOT built ({reason}).\n"
        "         The package is installed and works with the pure-PyTorch reference dispatch\n"
        "         (model.moe.dispatch=auto -> reference). To build it: `pip install --no-build-isolation -e .`\n"
        "         with torch installed and a C++ compiler on PATH.\n"
        f"{bar}\n\n")


def _extension_and_cmd():
    """(ext_modules, cmdclass) for moe._C, or ([], {}) with a warning when it cannot be built."""
    if os.environ.get("MOE_BUILD_EXT", "1") == "0":
        _warn("MOE_BUILD_EXT=0")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # no torch at build time (e.g. build isolation)
        _warn(f"torch is not importable at build time: {e!r}")
        return [], {}

    want_cuda = os.environ.get("MOE_BUILD_CUDA")
    has_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if want_cuda == "1" and not has_cuda:
        _warn("MOE_BUILD_CUDA=1 but torch has no CUDA or no CUDA toolkit (CUDA_HOME) was found")
        return [], {}
    use_cuda = has_cuda and want_cuda != "0"

    sources = [os.path.join(CSRC, f) for f in ("registration.cpp", "dispatch_cpu.cpp", "dispatch_cpu_avx2.cpp",
                                                  "experts_cpu.cpp", "router_cpu.cpp")]
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]
    link = ["-fopenmp"]
    if sys.platform == "darwin":  # Apple clang has no -fopenmp; at::parallel_for then runs serially
        cxx.remove("-fopenmp")
        link = []
    macros = []
    if use_cuda:
        sources += [os.path.join(CSRC, "dispatch_cuda.cpp"), os.path.join(CSRC, "dispatch_kernels.cu")]
        macros.append(("MOE_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            EXT_NAME, sources, define_macros=macros, extra_link_args=link,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]})
    else:
        ext = cpp_extension.CppExtension(EXT_NAME, sources, define_macros=macros, extra_link_args=link,
                                         extra_compile_args={"cxx": cxx})

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class OptionalBuildExt(base):
        """BuildExtension that turns a failed build into one warning instead of a failed install."""

        def run(self):
            start = time.perf_counter()
            try:
                super().run()
            except BaseException as e:  # CompileError, LinkError, missing compiler, ninja errors, ...
                if isinstance(e, KeyboardInterrupt):
                    raise
                self.extensions = []
                _warn(f"build failed: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
                return
            sys.stderr.write(f"moe: built {EXT_NAME} ({'CUDA' if use_cuda else 'CPU'}) in "
                             f"{time.perf_counter() - start:.1f}s\n")

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

        def get_output_mapping(self):
            return super().get_output_mapping() if self.extensions else {}

    return [ext], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = _extension_and_cmd()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
