import os
import pathlib
import sys
import tempfile
import zlib

import torch

# Without a GPU the Triton kernels run under the interpreter; Triton reads this when kernels are defined,
# which the ops do lazily, so setting it here (before any test runs) is early enough.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import sparsedoctor_kernels._alloc  # noqa: E402
from sparsedoctor_kernels._backend import why_backend_cannot_run  # noqa: E402
from sparsedoctor_kernels.ops import IMPLEMENTATIONS  # noqa: E402
from sparsedoctor_kernels.testing.tolerances import TOLERANCES  # noqa: E402


def cpu_backends(op: str) -> list[str]:
    """The op's backends that run on CPU tensors here (the Triton ones under the interpreter)."""
    return [b for b in IMPLEMENTATIONS[op] if why_backend_cannot_run(b, torch.device("cpu")) is None]


def backend_supports(backend: str, dtype: torch.dtype) -> bool:
    """The Triton interpreter computes with numpy: no bfloat16, and float16 is not worth its time."""
    return backend != "triton" or dtype in (torch.float32, torch.float64)

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0,
                 name: str = "") -> None:
    """Compare with a float64 oracle at the tolerance of the dtype the computation ran in."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(),
                               atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's id: fresh inputs per test, reproducible run to run."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv("SPARSEDOCTOR_BACKEND", raising=False)


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    """Kernel outputs start as NaN / a sentinel, so an element a kernel fails to write fails the test."""
    monkeypatch.setattr(sparsedoctor_kernels._alloc, "poison_outputs", True)


@pytest.fixture(autouse=True, scope="session")
def _temporary_files_under_pytest(tmp_path_factory):
    """Whatever a test or a module-scoped fixture (or torch, torchrun and their workers) puts in "the temporary
    directory" lands in pytest's own temporary tree: no test writes outside it. Session-wide, so module-scoped
    fixtures, which run before any function-scoped one, are covered too."""
    scratch = tmp_path_factory.mktemp("tmpdir")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(scratch))
        # Compiler caches default to directories under /tmp or $HOME: keep those in pytest's tree too, unless
        # a caller hands in a Triton cache to share on purpose (benchmarks/gpu_session.py, so that a GPU
        # session compiles each kernel once, not once per stage).
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(scratch / "torchinductor"))
        patch.setenv("HF_DATASETS_CACHE", str(scratch / "hf-datasets"))  # lm-eval's datasets, if not told
        patch.setenv("TRITON_CACHE_DIR", os.environ.get("SPARSEDOCTOR_TEST_TRITON_CACHE") or str(scratch / "triton"))
        patch.setattr(tempfile, "tempdir", str(scratch))
        yield
