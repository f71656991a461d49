"""Shared benchmark plumbing: timing quantiles, peak memory, copy bandwidth, environment, the results CSV.

On CUDA, one sample is a burst of back-to-back calls between two CUDA events, divided by the burst's length:
no L2 flush between repetitions, which would give the host a head start and hide its launch overhead (the
cost that CUDA-graph replay, `graph_replay`, removes). On CPU, `time.perf_counter` around each call. Peak
memory is what one call allocates above what was held before it.
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
import re
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# `value` and `unit`: a figure that is not a time (saved bytes per token, launches per layer).
CSV_COLUMNS = ["op", "impl", "shape", "T", "E", "k", "r", "dtype", "mode", "ms_p20", "ms_p50", "ms_p80",
               "peak_mem_mb", "gbps", "device", "torch", "triton", "commit", "tokens_per_s", "value", "unit"]
KEY_COLUMNS = ["op", "impl", "shape", "T", "E", "k", "r", "dtype", "mode", "device"]
def default_results_dir() -> pathlib.Path:
    """benchmarks/results/ of a source checkout (where results are committed), else ./sparsedoctor-bench."""
    checkout = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
    return checkout / "results" if checkout.is_dir() else pathlib.Path("sparsedoctor-bench")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Timing:
    ms_p20: float
    ms_p50: float
    ms_p80: float
    peak_mem_mb: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Memory one call allocates above what was held before it (CUDA only; NaN elsewhere)."""
    if device.type != "cuda":
        return math.nan
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak / 2**20


def time_call(fn: Callable[[], object], device: torch.device, *, rep_ms: float = 100.0,
              min_reps: int = 5) -> Timing:
    """p20 / p50 / p80 of one call in milliseconds, after a warm-up call (compilation, autotuning)."""
    fn()
    synchronize(device)
    peak = peak_memory_mb(fn, device)
    samples: list[float] = []
    if device.type == "cuda":
        burst = _burst_length(fn)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        deadline = time.perf_counter() + rep_ms / 1000
        while len(samples) < min_reps or time.perf_counter() < deadline:
            start.record()
            for _ in range(burst):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / burst)
    else:
        deadline = time.perf_counter() + rep_ms / 1000
        while len(samples) < min_reps or time.perf_counter() < deadline:
            began = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - began) * 1000)
    p20, p50, p80 = (statistics.quantiles(samples, n=10, method="inclusive")[i] for i in (1, 4, 7))
    return Timing(p20, p50, p80, peak)


def _burst_length(fn: Callable[[], object], target_ms: float = 2.0) -> int:
    """Calls per CUDA-event sample: enough for about `target_ms`, so event resolution does not matter."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return max(1, min(100, int(target_ms / max(start.elapsed_time(end), 1e-3))))


def graph_replay(fn: Callable[[], object], device: torch.device) -> Callable[[], None] | str:
    """`fn` captured in a CUDA graph (after warm-up on a side stream), as a replay callable; or, when `fn`
    cannot be captured (a host sync, a CPU device), the reason as a string."""
    if device.type != "cuda":
        return "CUDA graphs need a GPU"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as error:  # noqa: BLE001 - a host sync or an uncapturable op: report, do not time
        torch.cuda.synchronize()
        return f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return graph.replay


def copy_bandwidth_gbps(device: torch.device, megabytes: int = 512) -> float:
    """Measured device-to-device copy bandwidth (bytes read + bytes written per second), the roofline the
    benchmark tables quote their GB/s against."""
    numel = megabytes * 2**20 // 4
    src = torch.empty(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = time_call(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (timing.ms_p50 * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu-{platform.machine()}"


def environment(device: torch.device) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "commit": git_commit()}


def git_commit() -> str:
    """The checkout's commit (`-dirty` when tracked files changed); SPARSEDOCTOR_COMMIT where there is no .git
    (the copy of the tree a GPU session runs in), else "-"."""
    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SPARSEDOCTOR_COMMIT", "-")
    return commit + ("-dirty" if dirty else "")


def results_path(device: torch.device, directory: pathlib.Path | None = None) -> pathlib.Path:
    """One CSV per device model: `results/<device-name>.csv`, the name lower-cased and dashed."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return (directory or default_results_dir()) / f"{slug}.csv"


def write_rows(path: pathlib.Path, rows: list[dict]) -> None:
    """Append `rows` to the CSV, replacing earlier rows with the same key (op, impl, shape, sizes, dtype,
    mode, device): a rerun updates its own numbers and leaves every other row alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if path.exists():
        with path.open(newline="") as handle:
            new_keys = {tuple(str(row[c]) for c in KEY_COLUMNS) for row in rows}
            kept = [row for row in csv.DictReader(handle)
                    if tuple(row[c] for c in KEY_COLUMNS) not in new_keys]
    # Written beside it and renamed over it: a script killed mid-write leaves the old file whole, not empty.
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(kept + rows)
    os.replace(partial, path)


def format_row(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def row(op: str, impl: str, shape: str, sizes: dict, dtype: torch.dtype, mode: str, timing: Timing,
        ideal_bytes: int, env: dict) -> dict:
    gbps = ideal_bytes / (timing.ms_p50 * 1e-3) / 1e9
    return {"op": op, "impl": impl, "shape": shape, "T": sizes.get("T", "-"), "E": sizes.get("E", "-"),
            "k": sizes.get("k", "-"), "r": sizes.get("r", "-"), "dtype": str(dtype).removeprefix("torch."),
            "mode": mode, "ms_p20": round(timing.ms_p20, 5), "ms_p50": round(timing.ms_p50, 5),
            "ms_p80": round(timing.ms_p80, 5), "peak_mem_mb": round(timing.peak_mem_mb, 2), "gbps": round(gbps, 2),
            **env, "tokens_per_s": "", "value": "", "unit": ""}


def gradient_modes(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> dict[str, Callable]:
    """The three timed callables of one implementation: forward, backward of a kept graph, both."""
    state = {}

    def fwd():
        return forward()

    def full():
        out = forward()
        return torch.autograd.grad(out, inputs, torch.ones_like(out))

    def bwd():
        if "out" not in state:  # one forward, then time backward passes over its retained graph
            out = forward()
            state["out"], state["grad"] = out, torch.ones_like(out)
        return torch.autograd.grad(state["out"], inputs, state["grad"], retain_graph=True)

    return {"fwd": fwd, "bwd": bwd, "full": full}


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [headers] + [[format_row(v) for v in r] for r in rows]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(headers))]
    for index, cells_row in enumerate(cells):
        print("  ".join(str(v).rjust(w) for v, w in zip(cells_row, widths)))
        if index == 0:
            print("  ".join("-" * w for w in widths))


MODES = ["fwd", "bwd", "full"]
GRAPH_MODES = ["fwd+graph", "full+graph"]  # the same calls replayed from a CUDA graph: no host overhead


def argument_parser(description: str, gpu_tokens: list[int], cpu_tokens: list[int]):
    """The arguments every benchmark script takes; the defaults follow the GPU grid when CUDA is there."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--tokens", nargs="+", type=int, default=gpu_tokens if cuda else cpu_tokens)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16" if cuda else "float32")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="time budget per measurement")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="CSV to update (default: benchmarks/results/<device>.csv)")
    return parser


def script_main(argv, description: str, gpu_tokens: list[int], cpu_tokens: list[int], run: Callable,
                summarize: Callable, add_arguments: Callable | None = None) -> int:
    """A benchmark script's main: common arguments (plus the script's own), then `run_script`."""
    parser = argument_parser(description, gpu_tokens, cpu_tokens)
    if add_arguments is not None:
        add_arguments(parser)
    return run_script(parser.parse_args(argv), run, summarize)


_echoed: list[dict] = []  # the rows of the running script measured so far, kept if it is stopped


def _stop_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def run_script(args, run: Callable, summarize: Callable) -> int:
    """Measure (rows echoed as CSV while they come), update the results CSV, print the summary table last.
    A script stopped part way (Ctrl-C, SIGTERM from a time limit, an error) still writes the rows it measured."""
    device = torch.device(args.device)
    path = args.out or results_path(device)
    print(f"# {environment(device)}", flush=True)
    print(",".join(CSV_COLUMNS), flush=True)
    _echoed.clear()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if in_main_thread else None
    try:
        rows = run(args)
    except BaseException:
        if _echoed:
            write_rows(path, list(_echoed))
            print(f"\nstopped: the {len(_echoed)} rows measured so far written to {path}", flush=True)
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    write_rows(path, rows)
    summarize(rows, copy_bandwidth_gbps(device))
    print(f"\n{len(rows)} rows written to {path}")
    return 0


def echo(row_dict: dict) -> None:
    _echoed.append(row_dict)
    print(",".join(format_row(row_dict[c]) for c in CSV_COLUMNS), flush=True)
