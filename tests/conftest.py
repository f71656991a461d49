import pathlib
import sys
import zlib

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from sparsedoctor_kernels.check import TOLERANCES  # noqa: E402

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
