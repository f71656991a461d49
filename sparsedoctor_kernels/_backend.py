"""Backend selection shared by every op.

`backend=None` picks the first runnable backend of the op's preference order for the inputs' device (GPU
backends on CUDA tensors, the torch reference on CPU tensors); `SPARSEDOCTOR_BACKEND` overrides that automatic
choice and an explicit `backend=` overrides both. A backend that cannot run raises RuntimeError saying what is
missing: there is never a silent fallback.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_BACKEND = "SPARSEDOCTOR_BACKEND"


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Probed once per process; plain dicts rather than functools.cache, which torch.compile warns about.
_probed: dict[str, str | None] = {}


def triton_import_error() -> str | None:
    if "triton" not in _probed:
        missing = importlib.util.find_spec("triton") is None
        _probed["triton"] = "the `triton` package is not installed (pip install triton)" if missing else None
    return _probed["triton"]


def cuda_extension_error() -> str | None:
    if "cuda" not in _probed:
        try:
            from sparsedoctor_kernels import _C  # noqa: F401
            _probed["cuda"] = None
        except ImportError as error:
            _probed["cuda"] = (
                f"the CUDA extension sparsedoctor_kernels._C is not built ({error}); reinstall with "
                "`SPARSEDOCTOR_BUILD_CUDA=1 pip install --no-build-isolation -v .` to build it or see why not")
    return _probed["cuda"]


def why_backend_cannot_run(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on tensors of `device`, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "triton":
        missing = triton_import_error()
        if missing:
            return missing
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreter_enabled():
            return None
        return (f"Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
                f"triton is imported; got tensors on {device}")
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA extension needs CUDA tensors, got tensors on {device}"
        return cuda_extension_error()
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def resolve_backend(op: str, requested: str | None, device: torch.device, implemented: Sequence[str]) -> str:
    """The backend `op` runs on. `implemented` lists the op's backends in order of preference."""
    if requested is None:
        requested = os.environ.get(ENV_BACKEND) or None
    if requested is None:
        # The reference is the CPU choice; on the GPU the fastest runnable backend, the reference last.
        candidates = [b for b in implemented if b != "torch"] if device.type == "cuda" else []
        for candidate in candidates:
            if why_backend_cannot_run(candidate, device) is None:
                return candidate
        return "torch"
    if not isinstance(requested, str) or requested not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {requested!r}")
    if requested not in implemented:
        raise RuntimeError(
            f"{op}: backend {requested!r} is not implemented in this version of sparsedoctor_kernels "
            f"(implemented: {', '.join(repr(b) for b in implemented)})"
        )
    reason = why_backend_cannot_run(requested, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {requested!r} cannot run: {reason}")
    return requested


def default_validate(validate: bool | None, device: torch.device) -> bool:
    """Data-dependent checks (expert ids in range) need a host sync: on by default only off the GPU."""
    if validate is None:
        validate = device.type != "cuda"
    # Data-dependent checks would break a torch.compile graph; the kernels never index out of bounds anyway.
    return bool(validate) and not torch.compiler.is_compiling()


class LazyImplementation:
    """A backend module imported on first use: Triton reads TRITON_INTERPRET when it defines kernels, and
    importing the package should not pay for compiling toolchains it may never use."""

    def __init__(self, module_name: str):
        self.module_name = module_name

    def __getattr__(self, name: str):
        return getattr(importlib.import_module(self.module_name), name)

    def __repr__(self) -> str:
        return f"LazyImplementation({self.module_name!r})"


def calls_directly(*tensors: torch.Tensor | None) -> bool:
    """Whether an op may call its implementation's forward directly, skipping its custom op and autograd
    Function: nothing to record (grad mode off, as in generation and evaluation), nothing tracing
    (torch.compile, export) and plain tensors only (a subclass such as DTensor or FakeTensor needs the
    dispatcher; a Parameter is a plain tensor). The two layers of Python dispatch cost more than a decoding
    step's matmuls."""
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and all(t is None or type(t) in _PLAIN_TENSORS for t in tensors))


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
