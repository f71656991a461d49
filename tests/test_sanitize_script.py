"""benchmarks/sanitize_ops.py, the script compute-sanitizer runs on the GPU, works and catches a wrong result
(a wrong output or a wrong gradient)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from sparsedoctor_kernels import reference
from sparsedoctor_kernels.ops import IMPLEMENTATIONS

pytestmark = pytest.mark.slow  # every op's sanitizer cases under the Triton interpreter

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sanitize_ops.py"
# The GPU where there is one (as compute-sanitizer runs it); on CPU the Triton kernels run under the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _load():
    spec = importlib.util.spec_from_file_location("sanitize_ops", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sanitize_script_runs_route_and_queue_cases(capsys):
    assert _load().main(["--ops", "route", "queue", "--device", DEVICE]) == 0
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
    assert script.main(["--ops", "queue", "--device", DEVICE]) == 1
    assert "WRONG: queue triton" in capsys.readouterr().out


@pytest.mark.parametrize("op", ["lora_moe", "lora_moe_regate", "infonce", "group_infonce"])
def test_sanitize_script_cases_match_outputs_and_gradients(op, capsys):
    assert _load().main(["--ops", op, "--device", DEVICE]) == 0
    out = capsys.readouterr().out
    assert f"{op}: done" in out and "every case matched the reference" in out


class ScalesOneResult:
    """A backend that is the reference except that one result of `method` (one gradient) is doubled."""

    def __init__(self, real, method, index=None, **extra):
        self._real, self._method, self._index, self._extra = real, method, index, extra

    def __getattr__(self, name):
        if name in self._extra:
            return self._extra[name]
        attribute = getattr(self._real, name)
        if name != self._method:
            return attribute

        def scaled(*args):
            result = attribute(*args)
            if self._index is None:
                return 2 * result
            return tuple(2 * r if i == self._index else r for i, r in enumerate(result))

        return scaled


def _wrong_gradient_backends():
    """op -> ([(an IMPLEMENTATIONS dict, its fake "triton" entry), ...], the gradient the fakes get wrong)."""
    lora_moe_module = importlib.import_module("sparsedoctor_kernels.ops.lora_moe")
    grouped, dense = IMPLEMENTATIONS["lora_moe"], lora_moe_module.DENSE
    return {
        # route's backward returns the logits' gradient; lora_moe's (dx, dA, dB, dweights) and regate's
        # (..., dweights2); the InfoNCE ops compute their gradients in the forward, (loss, dquery, dpositive)
        # and (loss, dx).
        "route": ([(IMPLEMENTATIONS["route"], ScalesOneResult(reference.routing, "backward"))], "grad logits"),
        "lora_moe": ([(grouped, ScalesOneResult(reference.lora_moe, "backward", 3)),
                      (dense, ScalesOneResult(reference.lora_moe_dense, "backward", 3))], "grad weights"),
        "lora_moe_regate": ([(grouped, ScalesOneResult(reference.lora_moe, "backward", 0)),
                             (dense, ScalesOneResult(reference.lora_moe_dense, "regate_backward", 4))],
                            "grad rows_weights"),
        "infonce": ([(IMPLEMENTATIONS["infonce_queue_loss"], ScalesOneResult(reference.infonce, "forward", 2))],
                    "grad positive"),
        "group_infonce": ([(IMPLEMENTATIONS["group_infonce"], ScalesOneResult(
            reference.group_infonce, "forward", 1, fits=lambda *shape: True))], "grad x"),
    }


@pytest.mark.parametrize("op", ["route", "lora_moe", "lora_moe_regate", "infonce", "group_infonce"])
def test_sanitize_script_reports_a_wrong_gradient(op, monkeypatch, capsys):
    """A "triton" backend whose outputs are right and one of whose gradients is doubled: every case with a
    nonzero such gradient is reported, and nothing else is."""
    fakes, gradient = _wrong_gradient_backends()[op]
    script = _load()
    monkeypatch.setattr(script, "_backends", lambda op, device: ["triton"])
    for implementations, fake in fakes:
        monkeypatch.setitem(implementations, "triton", fake)
    assert script.main(["--ops", op, "--device", DEVICE]) == 1
    wrong = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WRONG: ")]
    assert wrong and all(line.startswith(f"WRONG: {op} triton") and ": grad " in line for line in wrong), wrong
    assert any(line.endswith(f": {gradient}") for line in wrong), wrong
