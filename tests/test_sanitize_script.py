"""benchmarks/sanitize_ops.py, the script compute-sanitizer runs on the GPU, works and catches a wrong result."""

import importlib.util
from pathlib import Path

import pytest

from sparsedoctor_kernels.ops import IMPLEMENTATIONS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sanitize_ops.py"


def _load():
    spec = importlib.util.spec_from_file_location("sanitize_ops", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sanitize_script_runs_route_and_queue_cases(capsys):
    assert _load().main(["--ops", "route", "queue", "--device", "cpu"]) == 0
    assert "every case matched the reference" in capsys.readouterr().out


def test_sanitize_script_reports_a_wrong_backend(monkeypatch, capsys):
    real = IMPLEMENTATIONS["ExpertQueue.enqueue"]["torch"]

    class DropsTheLastRow:
        @staticmethod
        def enqueue(queue_keys, ptr, size, keys, experts):
            real.enqueue(queue_keys, ptr, size, keys[:-1], experts[:-1])

    script = _load()
    monkeypatch.setattr(script, "_backends", lambda op, device: ["triton"])
    monkeypatch.setitem(IMPLEMENTATIONS["ExpertQueue.enqueue"], "triton", DropsTheLastRow)
    if "triton" not in IMPLEMENTATIONS["ExpertQueue.enqueue"]:
        pytest.skip("no triton backend registered")
    assert script.main(["--ops", "queue", "--device", "cpu"]) == 1
    assert "WRONG: queue triton" in capsys.readouterr().out
