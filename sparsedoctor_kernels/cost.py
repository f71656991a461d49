"""Bytes and FLOPs of each `lora_moe` strategy, and the per-call choice between them.

A LoRA-MoE call is memory-bound unless E*r grows large: its arithmetic intensity is a few FLOP/byte against
a ridge of ~250 on an H100, so the passes over x, grad_y and the [T, d_out] output decide the time. The
model counts, per launch of each strategy, what it must read and write (activations in x's dtype, rank-space
intermediates in fp32, parameters once) and the FLOPs of its dot products; a strategy's time is
max(bytes / bandwidth, FLOPs / FLOP rate), forward plus backward, with `out=` (the layer's case: the delta is
added into the frozen output, one read-modify-write per pass).

- grouped: the (token, slot) pairs sorted by expert; x gathered once per slot, h = A[e] x per pair, the output
  read and written once per slot; the backward gathers grad_y twice (u and dB) and x once per slot (dA), and
  writes dx slot by slot. FLOPs: only the chosen experts.
- dense: every expert of every token, h = x @ A_cat^T from one read of x, the gate selected in, one
  read-modify-write of the output for all slots; the backward reads grad_y twice (u and dB), x once (dA) and
  writes dx once. FLOPs: E/k times the grouped ones, nearly free while E*r is small.

The torch backend's eager implementations (`sparsedoctor_kernels.eager`) also pay a host dispatch per aten call,
which decides at small T (decoding): grouped makes a few matmuls per expert that has pairs, dense a fixed handful
of calls. Its grouped strategy reads the per-expert run lengths on the host, so on a GPU the torch backend runs
dense unless asked.

The same numbers are the benchmark's roofline column (`sparsedoctor_kernels.bench.lora_moe`) and docs/gpu.md's
table (`benchmarks/roofline.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

STRATEGIES = ("grouped", "dense")
ENV_STRATEGY = "SPARSEDOCTOR_LORA_MOE_STRATEGY"
RANK_SPACE_BYTES = 4  # h, u and their gated forms are kept in fp32


@dataclass(frozen=True)
class DeviceRates:
    """Sustained rates the model divides by: copy bandwidth and the dot-product FLOP rate of one dtype."""

    name: str
    bytes_per_s: float
    flops_per_s: float


# H100 SXM: ~3.0 TB/s sustained copy (3.35 peak); bf16/fp16 dense tensor cores ~990 TFLOP/s peak, of which
# skinny (K = E*r) tiles reach perhaps half; fp32 without TF32 runs on the CUDA cores (~67 TFLOP/s peak).
# H200: the same SMs with ~4.0 TB/s. Measured figures replace these once the GPU benchmark has run.
GPU_RATES = {
    "H200": (4.0e12, 450e12, 45e12),
    "H100": (3.0e12, 450e12, 45e12),
    "A100": (1.6e12, 200e12, 15e12),
}
_DEFAULT_GPU = "H100"
# The CPU's are effective rates of the torch backend's eager calls, not of the memory system: fitted so that
# the choice matches timed forward + backward calls on a 2-core x86 machine at one thread (T 16..2048, d_in
# 512..2560, E 8 and 32; docs/benchmarks.md). Gathers and scatters of rows (the grouped strategy's) run far
# below copy bandwidth there, which is what the low byte rate stands for.
_CPU_RATES = DeviceRates("cpu", 1e9, 30e9)


_rates_by_device: dict[tuple[str, int | None, bool], DeviceRates] = {}


def device_rates(device: torch.device | str, dtype: torch.dtype) -> DeviceRates:
    """The rates of `device` for `dtype`, looked up once per device (the ops call this on every call)."""
    device = torch.device(device)
    sixteen_bit = dtype in (torch.bfloat16, torch.float16)
    key = (device.type, device.index, sixteen_bit)
    if key not in _rates_by_device:
        _rates_by_device[key] = _lookup_rates(device, sixteen_bit)
    return _rates_by_device[key]


def _lookup_rates(device: torch.device, sixteen_bit: bool) -> DeviceRates:
    if device.type != "cuda":
        return _CPU_RATES
    # get_device_properties (not get_device_name): torch.compile folds it to a constant instead of breaking.
    name = torch.cuda.get_device_properties(device).name if torch.cuda.is_available() else _DEFAULT_GPU
    known = next((key for key in GPU_RATES if key in name), _DEFAULT_GPU)
    bandwidth, half_flops, single_flops = GPU_RATES[known]
    return DeviceRates(known, bandwidth, half_flops if sixteen_bit else single_flops)


@dataclass(frozen=True)
class Cost:
    """Bytes moved and FLOPs of one call, forward and backward."""

    bytes_fwd: int
    bytes_bwd: int
    flops_fwd: int
    flops_bwd: int

    def seconds(self, rates: DeviceRates, mode: str = "full") -> float:
        return max(self.bytes(mode) / rates.bytes_per_s, self.flops(mode) / rates.flops_per_s)

    def bytes(self, mode: str = "full") -> int:
        return _of_mode(mode, self.bytes_fwd, self.bytes_bwd)

    def flops(self, mode: str = "full") -> int:
        return _of_mode(mode, self.flops_fwd, self.flops_bwd)


def _of_mode(mode: str, forward: int, backward: int) -> int:
    return {"fwd": forward, "bwd": backward, "full": forward + backward}[mode]


def lora_moe_cost(strategy: str, num_tokens: int, d_in: int, d_out: int, num_experts: int, top_k: int, rank: int,
                  element: int) -> Cost:
    """The model above for `out=` calls; `element` is the byte size of x's dtype."""
    tokens, pairs, columns = num_tokens, num_tokens * top_k, num_experts * rank
    parameters = columns * (d_in + d_out) * element
    if strategy == "grouped":
        parameters = parameters * min(num_experts, pairs) // num_experts  # only the experts that get pairs
    ids = pairs * 12  # weights (fp32) and ids (int64) read once
    if strategy == "grouped":
        plan = pairs * 4 * 4  # keys, sorted order and tile tables, written and read back
        bytes_fwd = (pairs * d_in * element + 2 * pairs * rank * RANK_SPACE_BYTES
                     + 2 * top_k * tokens * d_out * element + parameters + ids + plan)
        bytes_bwd = (2 * pairs * d_out * element + pairs * d_in * element + (2 * top_k - 1) * tokens * d_in * element
                     + 5 * pairs * rank * RANK_SPACE_BYTES + 3 * parameters + ids)
        flops_fwd = 2 * pairs * rank * (d_in + d_out)
    elif strategy == "dense":
        bytes_fwd = (tokens * d_in * element + 3 * tokens * columns * RANK_SPACE_BYTES
                     + 2 * tokens * d_out * element + parameters + ids)
        bytes_bwd = (2 * tokens * d_out * element + 2 * tokens * d_in * element
                     + 5 * tokens * columns * RANK_SPACE_BYTES + 3 * parameters + 2 * ids)
        flops_fwd = 2 * tokens * columns * (d_in + d_out)
    else:
        raise ValueError(f"lora_moe strategy must be one of {STRATEGIES}, got {strategy!r}")
    return Cost(int(bytes_fwd), int(bytes_bwd), int(flops_fwd), int(2 * flops_fwd))


# Host time per eager aten call (dispatch on CPU; launch on a GPU), an order of magnitude.
EAGER_CALL_S = {"cpu": 5e-6, "cuda": 10e-6}


def eager_calls(strategy: str, num_tokens: int, num_experts: int, top_k: int) -> int:
    """Aten calls of one eager forward + backward: grouped's grow with the experts that get pairs (a few
    matmuls each), dense's do not."""
    if strategy == "dense":
        return 20
    return 12 + 6 * min(num_experts, num_tokens * top_k)


# Host time per kernel launch on a GPU (Triton's launcher and the driver), an order of magnitude: at a few
# tokens (decoding) the launches are the cost, so the strategy that launches fewer wins there.
KERNEL_LAUNCH_S = 5e-6


def kernel_launches(strategy: str, top_k: int) -> int:
    """Kernel launches of one Triton forward + backward (tests/test_launches.py pins them): dense a shrink and an
    expand forward, four backward; grouped the plan (2), shrink, gate scaling and an expand per slot forward,
    about twice that backward."""
    if strategy == "dense":
        return 6
    return 12 + 3 * top_k


# choose_strategy's answers: the ops ask on every call, and a decoding step's matmuls cost less than the model.
_chosen: dict[tuple, str] = {}
_CHOSEN_MAX = 4096


def choose_strategy(num_tokens: int, d_in: int, d_out: int, num_experts: int, top_k: int, rank: int,
                    dtype: torch.dtype, device: torch.device | str, backend: str = "triton") -> str:
    """The strategy the model expects to be faster for one forward + backward at these shapes (on the torch
    backend, its eager calls' host time counted too)."""
    device = torch.device(device)
    key = (num_tokens, d_in, d_out, num_experts, top_k, rank, dtype, device.type, device.index, backend)
    chosen = _chosen.get(key)
    if chosen is None:
        if len(_chosen) >= _CHOSEN_MAX:
            _chosen.clear()
        chosen = _chosen[key] = _choose(num_tokens, d_in, d_out, num_experts, top_k, rank, dtype, device, backend)
    return chosen


def _choose(num_tokens, d_in, d_out, num_experts, top_k, rank, dtype, device, backend) -> str:
    # Kernels on CPU tensors run under the Triton interpreter, which stands in for a GPU: they choose as one.
    stand_in = backend != "torch" and device.type == "cpu"
    rates = device_rates(torch.device("cuda") if stand_in else device, dtype)
    element = dtype.itemsize
    times = {s: lora_moe_cost(s, num_tokens, d_in, d_out, num_experts, top_k, rank, element).seconds(rates)
             for s in STRATEGIES}
    if backend == "torch":
        call_s = EAGER_CALL_S.get(device.type, EAGER_CALL_S["cuda"])
        times = {s: t + call_s * eager_calls(s, num_tokens, num_experts, top_k) for s, t in times.items()}
    else:
        times = {s: t + KERNEL_LAUNCH_S * kernel_launches(s, top_k) for s, t in times.items()}
    return min(STRATEGIES, key=lambda s: (times[s], s != "dense"))


def resolve_strategy(requested: str | None, backend: str, shapes: tuple[int, ...], dtype: torch.dtype,
                     device: torch.device) -> str:
    """Explicit argument, then SPARSEDOCTOR_LORA_MOE_STRATEGY, then the cost model's choice for the backend and
    device (dense for the torch backend off the CPU, whose grouped strategy would wait on the host)."""
    if requested is None:
        requested = os.environ.get(ENV_STRATEGY) or None
    if requested is None or requested == "auto":
        if backend == "torch" and torch.device(device).type != "cpu":
            return "dense"
        return choose_strategy(*shapes, dtype, device, backend=backend)
    if requested not in STRATEGIES:
        raise ValueError(f"lora_moe: strategy must be one of {STRATEGIES}, 'auto' or None (also via "
                         f"{ENV_STRATEGY}), got {requested!r}")
    return requested
