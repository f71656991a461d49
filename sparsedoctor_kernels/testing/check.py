"""`sparsedoctor check`: every op on every backend runnable here against the float64 torch reference.

Each case draws random inputs once in float64, runs the op (outputs and gradients) on the backend, device
and dtype under test, runs the reference on the float64 inputs, and compares. Odd sizes, partly filled and
wrapping queues, and an expert with no tokens are part of every case.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels._backend import BACKENDS, why_backend_cannot_run
from sparsedoctor_kernels.ops import IMPLEMENTATIONS
from sparsedoctor_kernels.testing.tolerances import TOLERANCES


def _random(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def _copy(tensor: torch.Tensor, device, dtype=None, grad: bool = False) -> torch.Tensor:
    """A private copy of a shared input (never the input itself: ops write into some of them)."""
    return tensor.to(device, dtype, copy=True).requires_grad_(grad)


def _run_route(inputs, backend, device, dtype):
    logits = _copy(inputs["logits"], device, dtype, grad=True)
    routing = sdk.route(logits, 3, backend=backend)
    loss = (routing.weights * inputs["grad_w"].to(device)).sum() + 5 * sdk.load_balance_loss(routing)
    loss.backward()
    return {"weights": routing.weights, "experts": routing.experts, "counts": routing.counts,
            "probs_mean": routing.probs_mean, "grad logits": logits.grad}


def _route_inputs(gen):
    return {"logits": _random(gen, 37, 11), "grad_w": _random(gen, 37, 3)}


def _run_lora_moe(inputs, backend, device, dtype, strategy=None):
    leaves = {name: _copy(inputs[name], device, dtype, grad=True) for name in ("x", "lora_a", "lora_b")}
    weights = _copy(inputs["weights"], device, torch.float32 if dtype != torch.float64 else dtype, grad=True)
    experts = inputs["experts"].to(device)
    base = _copy(inputs["base"], device, dtype)
    y = sdk.lora_moe(leaves["x"], leaves["lora_a"], leaves["lora_b"], weights, experts, scaling=1.5,
                     out=base, backend=backend, strategy=strategy)
    (y.float() * inputs["grad_y"].to(device)).sum().backward()
    return {"y": y, **{f"grad {name}": t.grad for name, t in leaves.items()}, "grad weights": weights.grad}


def _lora_moe_inputs(gen):
    num_tokens, d_in, d_out, num_experts, rank, top_k = 53, 24, 19, 5, 3, 2
    # Expert 4 never chosen: its gradients must come out zero.
    experts = torch.stack([torch.randperm(num_experts - 1, generator=gen)[:top_k] for _ in range(num_tokens)])
    return {
        "x": _random(gen, num_tokens, d_in),
        "lora_a": _random(gen, num_experts, rank, d_in) / 4,
        "lora_b": _random(gen, num_experts, d_out, rank) / 2,
        "weights": _random(gen, num_tokens, top_k).abs(),
        "experts": experts.int(),
        "base": _random(gen, num_tokens, d_out),
        "grad_y": _random(gen, num_tokens, d_out),
    }


def _run_sibling_lora_moe(inputs, backend, device, dtype):
    siblings = range(len(inputs["lora_b"]))
    x = _copy(inputs["x"], device, dtype, grad=True)
    lora_a = [_copy(inputs["lora_a"][s], device, dtype, grad=True) for s in siblings]
    lora_b = [_copy(inputs["lora_b"][s], device, dtype, grad=True) for s in siblings]
    weights = [_copy(inputs["weights"][s], device, torch.float32 if dtype != torch.float64 else dtype, grad=True)
               for s in siblings]
    outs = [_copy(inputs["base"][s], device, dtype) for s in siblings]
    ys = sdk.sibling_lora_moe(x, lora_a, lora_b, weights, [inputs["experts"][s].to(device) for s in siblings],
                              scaling=1.5, outs=outs, backend=backend)
    sum((y.float() * inputs["grad_y"][s].to(device)).sum() for s, y in zip(siblings, ys)).backward()
    results = {"grad x": x.grad}
    for s in siblings:
        results.update({f"y[{s}]": ys[s], f"grad lora_a[{s}]": lora_a[s].grad, f"grad lora_b[{s}]": lora_b[s].grad,
                        f"grad weights[{s}]": weights[s].grad})
    return results


def _sibling_lora_moe_inputs(gen):
    """q/k/v-like: one wider sibling and two narrow ones, expert 4 of each never chosen."""
    siblings = [_lora_moe_inputs(gen) for _ in range(3)]
    for sibling, d_out in zip(siblings[1:], (7, 7)):
        sibling["lora_b"] = sibling["lora_b"][:, :d_out]
        sibling["base"], sibling["grad_y"] = sibling["base"][:, :d_out], sibling["grad_y"][:, :d_out]
    stacked = {name: [sibling[name] for sibling in siblings] for name in siblings[0] if name != "x"}
    return {"x": siblings[0]["x"], **stacked}


def _run_queue(inputs, backend, device, dtype):
    expert_queue = sdk.ExpertQueue(4, 7, 5, dtype=dtype, device=device)
    expert_queue.keys.copy_(inputs["initial"])  # poison: untouched slots must keep these values
    for keys, experts in inputs["batches"]:
        expert_queue.enqueue(keys.to(device, dtype), experts.to(device), backend=backend, validate=False)
    return {"keys": expert_queue.keys, "ptr": expert_queue.ptr, "size": expert_queue.size}


def _queue_inputs(gen):
    # 3 rows out of range (dropped), expert 3 absent, expert 0 over capacity within one call.
    batches = []
    for rows in (5, 29, 11):
        experts = torch.randint(-1, 4, (rows,), generator=gen)
        experts[experts == 3] = 0
        batches.append((_random(gen, rows, 5), experts))
    return {"initial": _random(gen, 4, 7, 5), "batches": batches}


def _run_infonce(inputs, backend, device, dtype):
    query = _copy(inputs["query"], device, dtype, grad=True)
    positive = _copy(inputs["positive"], device, dtype, grad=True)
    queue_state = (inputs["queue_keys"].to(device, dtype), inputs["queue_size"].to(device))
    loss = sdk.infonce_queue_loss(query, positive, queue_state, inputs["query_experts"].to(device),
                                  temperature=0.2, reduction="none", backend=backend)
    (loss * inputs["grad_loss"].to(device)).sum().backward()
    return {"loss": loss, "grad query": query.grad, "grad positive": positive.grad}


def _infonce_inputs(gen):
    num_rows, dim, num_experts, capacity = 31, 16, 4, 9
    keys = torch.nn.functional.normalize(_random(gen, num_experts, capacity, dim), dim=-1)
    return {"query": _random(gen, num_rows, dim), "positive": _random(gen, num_rows, dim), "queue_keys": keys,
            "queue_size": torch.tensor([9, 3, 0, 6]), "query_experts": torch.randint(0, 4, (num_rows,), generator=gen),
            "grad_loss": _random(gen, num_rows)}


def _run_group_infonce(inputs, backend, device, dtype):
    x = _copy(inputs["x"], device, dtype, grad=True)
    loss = sdk.group_infonce(x, inputs["groups"].to(device), 6, temperature=0.2, backend=backend)
    (3 * loss).backward()
    return {"loss": loss, "grad x": x.grad}


def _group_infonce_inputs(gen):
    groups = torch.randint(0, 6, (29,), generator=gen)
    groups[::5] = -1  # padding rows: in no group
    return {"x": torch.softmax(_random(gen, 29, 7), -1), "groups": groups}


@dataclass(frozen=True)
class OpCase:
    op: str
    make_inputs: Callable[[torch.Generator], dict]
    run: Callable[..., dict]
    label: str = ""  # what the table calls it, when one op has several cases

    @property
    def name(self) -> str:
        return self.label or self.op


CASES = (
    OpCase("route", _route_inputs, _run_route),
    # The oracle is the torch backend in float64, grouped (exact selection) for every strategy; the tests hold that
    # backend to the readable references and a brute-force loop.
    OpCase("lora_moe", _lora_moe_inputs, functools.partial(_run_lora_moe, strategy="grouped"), "lora_moe (grouped)"),
    OpCase("lora_moe", _lora_moe_inputs, functools.partial(_run_lora_moe, strategy="dense"), "lora_moe (dense)"),
    OpCase("sibling_lora_moe", _sibling_lora_moe_inputs, _run_sibling_lora_moe),
    OpCase("ExpertQueue.enqueue", _queue_inputs, _run_queue),
    OpCase("infonce_queue_loss", _infonce_inputs, _run_infonce),
    OpCase("group_infonce", _group_infonce_inputs, _run_group_infonce),
)


@dataclass
class CheckResult:
    op: str
    backend: str
    device: str
    dtype: str
    max_error: float | None
    passed: bool | None  # None: skipped
    note: str = ""
    case: str = ""  # the op and its variant (a lora_moe strategy), as the table shows it


def _compare(got: dict, expected: dict, dtype: torch.dtype) -> tuple[float, bool, str]:
    atol, rtol = TOLERANCES[dtype]
    worst, passed, failing = 0.0, True, []
    for name, want in expected.items():
        have = got[name].detach().to("cpu", torch.float64)
        want = want.detach().to(torch.float64)
        if have.shape != want.shape:
            return float("inf"), False, f"{name}: shape {list(have.shape)} != {list(want.shape)}"
        error = (have - want).abs()
        worst = max(worst, float(error.max()) if error.numel() else 0.0)
        if not bool((error <= atol + rtol * want.abs()).all()):
            passed = False
            failing.append(name)
    return worst, passed, ("mismatch in " + ", ".join(failing)) if failing else ""


def _oracle(case: OpCase) -> OpCase:
    """The case whose torch run is the reference: the op's first (default) case."""
    return next(c for c in CASES if c.op == case.op)


def run_checks(devices: list[str] | None = None, seed: int = 0) -> list[CheckResult]:
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for case in CASES:
        inputs = case.make_inputs(torch.Generator().manual_seed(seed))
        expected = _oracle(case).run(inputs, "torch", torch.device("cpu"), torch.float64)
        for device_name in devices:
            device = torch.device(device_name)
            dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
            for backend in BACKENDS:
                if backend not in IMPLEMENTATIONS[case.op]:
                    results.append(CheckResult(case.op, backend, device_name, "-", None, None, "no such backend",
                                               case.name))
                    continue
                reason = why_backend_cannot_run(backend, device)
                if reason is not None:
                    results.append(CheckResult(case.op, backend, device_name, "-", None, None, reason, case.name))
                    continue
                for dtype in dtypes:
                    try:
                        got = case.run(inputs, backend, device, dtype)
                        error, passed, note = _compare(got, expected, dtype)
                    except Exception as exc:  # noqa: BLE001 - a crashing backend is a failed check
                        error, passed, note = float("nan"), False, f"{type(exc).__name__}: {exc}"
                    results.append(CheckResult(case.op, backend, device_name, str(dtype).removeprefix("torch."),
                                               error, passed, note, case.name))
    return results


def format_table(results: list[CheckResult]) -> str:
    header = ("op", "backend", "device", "dtype", "max error", "result", "note")
    rows = [header]
    for r in results:
        status = "skip" if r.passed is None else ("PASS" if r.passed else "FAIL")
        error = "-" if r.max_error is None else f"{r.max_error:.2e}"
        rows.append((r.case or r.op, r.backend, r.device, r.dtype, error, status, r.note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "-" * (sum(widths) + 2 * len(widths) + len(header[-1])))
    return "\n".join(line.rstrip() for line in lines)
