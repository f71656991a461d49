"""Build script: pure Python + Triton always; the CUDA extension `sparsedoctor_kernels._C` when possible.

SPARSEDOCTOR_BUILD_CUDA=1 forces the extension (the install fails, saying why, if it cannot be built),
SPARSEDOCTOR_BUILD_CUDA=0 skips it, unset builds it when torch is importable in the build environment, is a
CUDA build and a CUDA toolkit is found. torch is not a build requirement (see pyproject.toml), so the
extension is built with `pip install --no-build-isolation .`.
"""

import glob
import os
import sys

from setuptools import setup

ENV_FLAG = "SPARSEDOCTOR_BUILD_CUDA"


def _log(message: str) -> None:
    print(f"[sparsedoctor_kernels setup] {message}", file=sys.stderr)


def _build_mode() -> str:
    flag = os.environ.get(ENV_FLAG, "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"{ENV_FLAG} must be 0 or 1 (or unset), got {flag!r}")
    return {"": "auto", "0": "off", "1": "forced"}[flag]


def _why_cuda_cannot_build() -> str | None:
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return ("torch is not importable in the build environment; install torch first and build with "
                "`pip install --no-build-isolation .`")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return None


def _extension_setup(mode: str) -> dict:
    if mode == "off":
        _log(f"{ENV_FLAG}=0: skipping the optional CUDA extension")
        return {}
    reason = _why_cuda_cannot_build()
    if reason is not None:
        if mode == "forced":
            raise SystemExit(f"{ENV_FLAG}=1 but the CUDA extension cannot be built: {reason}")
        _log(f"skipping the optional CUDA extension: {reason}")
        return {}

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    root = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    extension = CUDAExtension(
        name="sparsedoctor_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(root, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )

    class BuildExtensionReportingFailure(BuildExtension):
        """In auto mode a failed compile leaves a working pure-Python install and says why."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001 - any compiler/linker failure
                if mode == "forced":
                    raise
                _log(f"the optional CUDA extension failed to build and is skipped: {error}")

    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": BuildExtensionReportingFailure.with_options(use_ninja=True)},
    }


setup(**_extension_setup(_build_mode()))
