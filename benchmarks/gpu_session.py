"""One call on a lent GPU machine: install, check, test, sanitize, benchmark and profile, inside a time budget.

    python3 benchmarks/gpu_session.py --commit <hash>                 # the whole session (default budget 570 s)
    python3 benchmarks/gpu_session.py --stages install check test_gpu  # some stages
    python3 benchmarks/gpu_session.py --list                           # the stages, their caps, what they run

A lease is short (15 minutes of device time, the machine's start included) and one command may run 10
minutes, so the session is one call that must return something whatever happens:
- stages run in priority order (correctness first, then the headline numbers, then the rest), each with its
  own cap, and none starts with less time left than it needs: a hang costs one stage, not the session;
- the CUDA extension is built forced; if that fails the project is installed without it, so that the Triton
  kernels are still tested and measured (the failure is in the summary and the install log);
- what comes back is few files (the device tool returns at most 8): `summary.md` (the stage table, the
  headline and the ncu table), `logs.tar.gz` (every stage's full log, the CSVs, the ncu CSVs) and the
  results CSV. They are rewritten after every stage, so a call killed at its limit still returns the
  stages that finished.
The stage table is printed last. The tree copied to the device has no `.git`: `--commit` (or the environment's
SPARSEDOCTOR_COMMIT) names the commit in the CSV rows. Standard library only: it runs before the install.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import importlib.util
import io
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PYTHON = sys.executable or "python3"
PACKAGING_RESERVE_S = 25.0  # kept back from the budget: a capped stage's stop (SIGINT, SIGTERM, SIGKILL) and the bundle
STOP_GRACE_S = ((signal.SIGINT, 6.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0))
# The lora_moe implementations timed everywhere: the library (cost model's pick and each strategy forced) and
# the eager baselines; the torch reference is not a baseline, torch.compile's has a stage of its own.
LIBRARY_AND_EAGER = ("triton", "triton-grouped", "triton-dense", "naive", "dense", "lora", "base")
# Time, DRAM traffic, and the traffic between the SMs and L2 (in 32-byte sectors): DRAM misses what a kernel's
# writes leave dirty in the 60 MB L2 when it ends, L2 counts each re-read of a tile, the byte model lies between.
NCU_METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum",
               "lts__t_sectors_srcunit_tex_op_read.sum", "lts__t_sectors_srcunit_tex_op_write.sum")


@dataclasses.dataclass
class Stage:
    """A command run from the repository root, its output in `<name>.log`."""

    name: str
    command: list[str]
    cap_s: float  # the most it may run
    min_s: float = 10.0  # not started with less than this left
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    fallback: Stage | None = None  # run when this stage fails (the install without the extension)
    needs: str | None = None  # a tool that must be on PATH, else the stage is skipped
    purpose: str = ""


@dataclasses.dataclass
class Outcome:
    name: str
    status: str  # ok, FAILED (rc N), TIMEOUT, skipped: <why>
    seconds: float
    result: str  # one line taken from the log


def find_tool(name: str) -> str | None:
    """A CUDA tool on PATH, or in the toolkit's and Nsight Compute's usual places."""
    found = shutil.which(name)
    if found:
        return found
    candidates = [pathlib.Path("/usr/local/cuda/bin") / name]
    candidates += sorted(pathlib.Path("/opt/nvidia").glob(f"nsight-compute/*/{name}"))
    candidates += sorted(pathlib.Path("/usr/local/cuda").glob(f"nsight-compute*/{name}"))
    return next((str(path) for path in candidates if path.is_file()), None)


def _bench(script: str, *args: str) -> list[str]:
    return [PYTHON, f"benchmarks/{script}", *args]


def _ncu(work: pathlib.Path, strategy: str) -> list[str]:
    # L2 flushed before each kernel (--cache-control all): every kernel starts cold, as the byte model assumes.
    return ["ncu", "--target-processes", "application-only", "--profile-from-start", "off", "--clock-control", "none",
            "--cache-control", "all", "--csv", "--print-units", "base", "--metrics", ",".join(NCU_METRICS),
            "--log-file", str(work / f"ncu_{strategy}.csv"), PYTHON, "benchmarks/profile_lora_moe.py", "--strategy",
            strategy]


def session_stages(work: pathlib.Path) -> list[Stage]:
    """The session, in the order it runs: what must not be missed first."""
    # No index and no version check: the machine has no network, and pip's check can stall on a DNS lookup.
    pip = [PYTHON, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
           "--disable-pip-version-check", "-v", "-e", "."]
    headline = ("--shapes", "gate_proj", "--tokens", "8192", "--configs", "8,2,16", "--rep-ms", "50")
    sanitize = [PYTHON, "benchmarks/sanitize_ops.py"]
    # Without the caching allocator every tensor is its own allocation, so the memory checker sees an access
    # past a tensor's end instead of a valid address inside a cached block.
    uncached = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    # Only the Python process (not Triton's ptxas children); CUDA API errors that torch and Triton provoke on
    # purpose (probing) are not the kernels' memory errors. A failed launch still fails the script itself.
    sanitizer = ["compute-sanitizer", "--target-processes", "application-only", "--report-api-errors", "no",
                 "--error-exitcode", "3"]
    pytest = [PYTHON, "-m", "pytest", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("pytest_timeout"):
        pytest += ["--timeout", "120"]  # one hung test does not take the stage's remaining tests with it
    workers = (lambda n: ["-n", str(n)] if importlib.util.find_spec("xdist") else [])
    return [
        Stage("install", pip, cap_s=180, min_s=0, purpose="editable install, the CUDA extension forced",
              env={"SPARSEDOCTOR_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "16"},
              fallback=Stage("install_without_cuda", pip, cap_s=90, min_s=0, env={"SPARSEDOCTOR_BUILD_CUDA": "0"},
                             purpose="the extension failed: install without it, test and measure the rest")),
        Stage("environment", [PYTHON, "benchmarks/gpu_session.py", "--describe"], cap_s=60,
              purpose="GPU, driver, torch, Triton, the extension's build"),
        Stage("check", [PYTHON, "-m", "sparsedoctor_kernels", "check", "--device", "cuda"], cap_s=150,
              min_s=20, purpose="every op on every backend against the float64 reference"),
        # Four workers: the tests' cold Triton compiles are serial in each process, and nothing in them is timed.
        Stage("test_gpu", pytest + workers(4) + ["-v", "--durations=10", "tests/test_gpu.py"], cap_s=200, min_s=30,
              purpose="the GPU tests: model shapes, bf16, CUDA graphs, compile"),
        Stage("bench_lora_moe_headline", _bench("bench_lora_moe.py", *headline, "--impls", *LIBRARY_AND_EAGER),
              cap_s=150, min_s=40, purpose="lora_moe at the headline shape: the library, the eager baselines, "
                                           "graph replay, uniform and skewed routing"),
        # Right after the headline: the same shape, the kernels compiled, and only this machine can count bytes.
        Stage("ncu_dense", _ncu(work, "dense"), cap_s=90, min_s=30, needs="ncu",
              purpose="DRAM and L2 bytes and time of each kernel of one dense-strategy layer call"),
        Stage("ncu_grouped", _ncu(work, "grouped"), cap_s=90, min_s=30, needs="ncu",
              purpose="the same for the grouped strategy"),
        Stage("memcheck", [*sanitizer, "--tool", "memcheck", *sanitize], cap_s=150, min_s=90,
              needs="compute-sanitizer", env=uncached, purpose="every op, hostile shapes, memory errors"),
        Stage("bench_step", _bench("bench_step.py", "--rep-ms", "200", "--impls", "base", "lora", "naive", "dense",
                                   "sparsedoctor"), cap_s=150, min_s=40,
              purpose="a Qwen3-4B-shaped training step, paper-mode contrastive term"),
        Stage("bench_step_router", _bench("bench_step.py", "--rep-ms", "200", "--impls", "sparsedoctor",
                                          "--contrastive-mode", "router"), cap_s=90, min_s=30,
              purpose="the same step with the library's default (router-mode) term"),
        Stage("bench_versus_lora", _bench("bench_versus_lora.py", "--reps", "5", "--figures", "step", "decode",
                                          "saved_bytes"), cap_s=120, min_s=40,
              purpose="issue 23's figures against PEFT LoRA r16 (needs peft on the machine)"),
        Stage("bench_sibling_lora_moe", _bench("bench_sibling_lora_moe.py", "--tokens", "8192", "--rep-ms", "50"),
              cap_s=90, min_s=30, purpose="q/k/v and gate/up from one pass against one lora_moe call each"),
        # torch.compile takes its own minutes to compile, so it has its own stage (triton again: one run's ratio).
        Stage("bench_lora_moe_compiled", _bench("bench_lora_moe.py", *headline, "--impls", "triton", "dense",
                                                "compiled", "--routings", "uniform"), cap_s=150, min_s=60,
              purpose="the torch.compile'd dense baseline beside the library, same shape"),
        Stage("racecheck", [*sanitizer, "--tool", "racecheck", *sanitize, "--ops", "queue"], cap_s=90, min_s=45,
              needs="compute-sanitizer", env=uncached, purpose="shared-memory races in the enqueue scan"),
        Stage("bench_lora_moe_grid", _bench("bench_lora_moe.py", "--shapes", "k_proj", "down_proj", "--tokens",
                                            "8192", "--configs", "8,2,16", "64,4,8", "--impls", *LIBRARY_AND_EAGER,
                                            "--routings", "uniform", "--no-graphs", "--rep-ms", "50"),
              cap_s=150, min_s=40, purpose="lora_moe at two more shapes and E=64"),
        Stage("tests", pytest + ["-q"] + workers(8) + ["tests", "--ignore=tests/test_gpu.py"], cap_s=300, min_s=60,
              purpose="the rest of the suite under this machine's torch, Triton and Transformers"),
    ]


def _one_line(log: pathlib.Path) -> str:
    """The line of a log that says most: pytest's tally, the sanitizer's error count, else the last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    patterns = (r"=+ .*(passed|failed|error).* =+$|^\d+ (passed|failed)", r"ERROR SUMMARY",
                r"rows (measured so far )?written to", r"every case matched|wrong results", r"MODEL strategy",
                r"^NVIDIA ")
    for pattern in patterns:
        hits = [line for line in lines if re.search(pattern, line)]
        if hits:
            return hits[-1].strip("= ")[:160]
    return lines[-1][:160] if lines else ""


class SessionStopped(Exception):
    """The session itself was told to stop (SIGTERM or SIGINT): the running stage is stopped, the bundle kept."""


def _stop_session(signum, frame):
    raise SessionStopped(signal.Signals(signum).name)


def run_stage(stage: Stage, seconds: float, logs: pathlib.Path, session_env: dict[str, str] | None = None
              ) -> tuple[str, float]:
    """Run one stage for at most `seconds` in its own process group; (status, elapsed)."""
    log = logs / f"{stage.name}.log"
    # The tree on the path as well as installed: if the install fails, the pure-Python and Triton code still runs.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(session_env or {}), **stage.env}
    start = time.monotonic()
    with log.open("w") as handle:
        handle.write(f"$ {' '.join(stage.command)}\n")
        handle.flush()
        try:
            process = subprocess.Popen(stage.command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as error:
            handle.write(f"could not start: {error}\n")
            return f"FAILED ({error.__class__.__name__})", time.monotonic() - start
        try:
            rc = process.wait(timeout=max(seconds, 0.1))
        except subprocess.TimeoutExpired:
            _stop_group(process)
            handle.write(f"\n[gpu_session] stopped after {seconds:.0f} s (its cap)\n")
            return "TIMEOUT", time.monotonic() - start
        except BaseException:
            _stop_group(process)
            handle.write("\n[gpu_session] stopped: the session was interrupted\n")
            raise
        _signal_group(process, signal.SIGKILL)  # what the stage left running (compile or test workers)
    return ("ok" if rc == 0 else f"FAILED (rc {rc})"), time.monotonic() - start


def _signal_group(process: subprocess.Popen, sig: int) -> bool:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _stop_group(process: subprocess.Popen) -> None:
    """SIGINT first (pytest then prints its failures, a benchmark writes the rows it has), then SIGTERM, then
    SIGKILL, to the stage's whole process group."""
    for sig, grace in STOP_GRACE_S:
        if not _signal_group(process, sig):
            return
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        _signal_group(process, signal.SIGKILL)
        return


def run_session(stages: list[Stage], budget_s: float, work: pathlib.Path, out: pathlib.Path,
                echo=print) -> list[Outcome]:
    """Every stage that fits in the budget, in order; the bundle in `out` refreshed after each."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    # One Triton cache for every stage, the tests' too (tests/conftest.py honours it): each kernel compiles once.
    cache = str(work / "triton-cache")
    session_env = {"TRITON_CACHE_DIR": cache, "SPARSEDOCTOR_TEST_TRITON_CACHE": cache}
    started = time.monotonic()
    outcomes: list[Outcome] = []
    pending = list(stages)
    while pending:
        stage = pending.pop(0)
        left = budget_s - (time.monotonic() - started) - PACKAGING_RESERVE_S
        tool = find_tool(stage.needs) if stage.needs else None
        if stage.needs and tool is None:
            outcome = Outcome(stage.name, f"skipped: no {stage.needs}", 0.0, "")
        elif left < stage.min_s or left <= 0:
            outcome = Outcome(stage.name, f"skipped: {max(left, 0):.0f} s left", 0.0, "")
        else:
            if tool is not None:
                stage = dataclasses.replace(stage, command=[tool, *stage.command[1:]])
            cap = min(stage.cap_s, left)
            echo(f"[{time.monotonic() - started:5.0f} s] {stage.name}: {stage.purpose} (cap {cap:.0f} s)", flush=True)
            began = time.monotonic()
            try:
                status, seconds = run_stage(stage, cap, logs, session_env)
            except BaseException as stop:
                outcomes.append(Outcome(stage.name, f"STOPPED ({stop!r})", time.monotonic() - began,
                                        _one_line(logs / f"{stage.name}.log")))
                write_bundle(outcomes, work, out, pending=[s.name for s in pending])
                raise
            outcome = Outcome(stage.name, status, seconds, _one_line(logs / f"{stage.name}.log"))
            if status != "ok":
                echo(_tail(logs / f"{stage.name}.log", 12), flush=True)
                if stage.fallback is not None:
                    pending.insert(0, stage.fallback)
        outcomes.append(outcome)
        echo(f"        {outcome.name}: {outcome.status} {outcome.seconds:.0f} s  {outcome.result}", flush=True)
        write_bundle(outcomes, work, out, pending=[s.name for s in pending])
    return outcomes


def _tail(path: pathlib.Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    | " + line[:200] for line in text[-lines:])


@functools.cache
def _headline_module():
    spec = importlib.util.spec_from_file_location("headline", ROOT / "benchmarks" / "headline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def results_csvs() -> list[pathlib.Path]:
    """The benchmark CSVs this machine wrote (the CPU ones are committed ones, not this session's)."""
    return _headline_module().gpu_csvs(RESULTS)


# metric -> (the launch's field, unit -> scale to seconds or bytes)
_TIME = {"nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0}
_BYTES = {"byte": 1, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9}
_SECTORS = {"sector": 32, "": 32}  # an L2 sector is 32 bytes
_NCU_FIELDS = {"gpu__time_duration.sum": ("seconds", _TIME), "dram__bytes_read.sum": ("dram_read", _BYTES),
               "dram__bytes_write.sum": ("dram_write", _BYTES),
               "lts__t_sectors_srcunit_tex_op_read.sum": ("l2_read", _SECTORS),
               "lts__t_sectors_srcunit_tex_op_write.sum": ("l2_write", _SECTORS)}


def parse_ncu_csv(text: str) -> list[dict]:
    """ncu's `--csv --print-units base` output (one row per kernel launch and metric) -> one dict per launch:
    name, seconds, and bytes read and written at DRAM and between the SMs and L2 (NaN where not reported).
    ncu's own messages, before the header and between rows, are skipped."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if '"Kernel Name"' in line and '"Metric Name"' in line), None)
    if start is None:
        return []
    launches: dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        if not row.get("Metric Name"):
            continue  # one of ncu's own messages between the rows
        launch = launches.setdefault(row.get("ID", ""), {"name": row.get("Kernel Name", "?"),
                                                         **{field: math.nan for field, _ in _NCU_FIELDS.values()}})
        field, scales = _NCU_FIELDS.get(row["Metric Name"], (None, None))
        if field is not None:
            unit = (row.get("Metric Unit") or "").strip().lower()
            launch[field] = _number(row.get("Metric Value", "")) * scales.get(unit, math.nan)
    return list(launches.values())


def _number(text: str) -> float:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return float("nan")


def _model_line(log: pathlib.Path) -> dict[str, str]:
    try:
        line = next(line for line in log.read_text(errors="replace").splitlines() if line.startswith("MODEL "))
    except (OSError, StopIteration):
        return {}
    return dict(field.split("=", 1) for field in line.split()[1:] if "=" in field)


def _mb(value: float) -> str:
    return "-" if math.isnan(value) else f"{value / 1e6:.1f}"


def ncu_table(work: pathlib.Path) -> str:
    """Per strategy: each kernel's time, DRAM and L2 bytes and DRAM bandwidth, and the call's total against the
    byte model (`sparsedoctor_kernels.cost`). DRAM misses writes still dirty in L2 when a kernel ends; L2 counts
    every re-read of a tile: the model's bytes should lie between the two."""
    blocks = []
    for strategy in ("dense", "grouped"):
        path = work / f"ncu_{strategy}.csv"
        if not path.is_file():
            continue
        launches = parse_ncu_csv(path.read_text(errors="replace"))
        if not launches:
            blocks.append(f"ncu {strategy}: no kernel rows parsed (see ncu_{strategy}.csv in logs.tar.gz)")
            continue
        model = _model_line(work / "logs" / f"ncu_{strategy}.log")
        lines = [f"ncu, {strategy} strategy: one layer call, forward + backward "
                 f"({' '.join(f'{k}={v}' for k, v in model.items() if not k.startswith('bytes'))})",
                 "| kernel | us | DRAM MB read | DRAM MB written | L2 MB read | L2 MB written | DRAM GB/s |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for launch in launches:
            dram = launch["dram_read"] + launch["dram_write"]
            rate = dram / launch["seconds"] / 1e9 if launch["seconds"] > 0 else math.nan
            lines.append(f"| {launch['name'][:60]} | {launch['seconds'] * 1e6:.1f} | {_mb(launch['dram_read'])} | "
                         f"{_mb(launch['dram_write'])} | {_mb(launch['l2_read'])} | {_mb(launch['l2_write'])} | "
                         f"{rate:.0f} |")
        seconds = math.fsum(launch["seconds"] for launch in launches)
        dram = math.fsum(launch["dram_read"] + launch["dram_write"] for launch in launches)
        l2 = math.fsum(launch["l2_read"] + launch["l2_write"] for launch in launches)
        modelled = sum(int(model.get(k, 0)) for k in ("bytes_fwd", "bytes_bwd"))
        versus = (f"; the byte model says {modelled / 1e6:.1f} MB (DRAM / model {dram / modelled:.2f}, "
                  f"L2 / model {l2 / modelled:.2f})") if modelled else ""
        lines.append(f"{len(launches)} launches, {seconds * 1e6:.1f} us of kernel time, {dram / 1e6:.1f} MB of DRAM "
                     f"traffic ({dram / seconds / 1e9 if seconds else math.nan:.0f} GB/s), {l2 / 1e6:.1f} MB "
                     f"between SMs and L2{versus}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _headline() -> str:
    try:
        return _headline_module().headline()
    except Exception as error:  # noqa: BLE001 - the summary must be written whatever the CSVs hold
        return f"(headline not generated: {error!r})"


def stage_table(outcomes: list[Outcome], pending: list[str] = ()) -> str:
    lines = ["| stage | status | s | result |", "| --- | --- | --- | --- |"]
    lines += [f"| {o.name} | {o.status} | {o.seconds:.0f} | {o.result.replace('|', '/')} |" for o in outcomes]
    lines += [f"| {name} | not reached | | |" for name in pending]
    return "\n".join(lines)


def write_bundle(outcomes: list[Outcome], work: pathlib.Path, out: pathlib.Path, pending: list[str] = ()) -> None:
    """summary.md, logs.tar.gz and the results CSVs into `out`: few files, plain names (the tool returns 8)."""
    parts = [f"# GPU session ({time.strftime('%Y-%m-%d %H:%M:%S %Z')})", stage_table(outcomes, pending)]
    describe = work / "logs" / "environment.log"
    if describe.is_file():
        parts.append("```\n" + describe.read_text(errors="replace").strip() + "\n```")
    parts.append(_headline())
    table = ncu_table(work)
    if table:
        parts.append(table)
    (out / "summary.md").write_text("\n\n".join(parts) + "\n")
    csvs = results_csvs()[:5]
    with tarfile.open(out / "logs.tar.gz.partial", "w:gz") as bundle:
        # The logs and the ncu CSVs; not the Triton cache beside them.
        for path in sorted([*work.glob("*.csv"), *(work / "logs").rglob("*")]):
            if path.is_file():
                bundle.add(path, arcname=str(path.relative_to(work)))
        for path in csvs:
            bundle.add(path, arcname=f"results/{path.name}")
        bundle.add(out / "summary.md", arcname="summary.md")
    (out / "logs.tar.gz.partial").replace(out / "logs.tar.gz")
    for path in csvs:
        shutil.copyfile(path, out / path.name)


def describe() -> int:
    """The environment stage: what ran where (the summary quotes this log)."""
    # Two queries: a field this driver does not know fails its whole query, and the GPU's name must not go with it.
    commands = [["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                ["nvidia-smi", "--query-gpu=clocks.max.sm,clocks.max.memory", "--format=csv"]]
    for command in commands:
        try:
            print(subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip())
        except (OSError, subprocess.TimeoutExpired) as error:
            print(f"{command[0]}: {error}")
    import torch  # noqa: PLC0415 - after the install

    print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"cuda available {torch.cuda.is_available()}")
    try:
        import triton  # noqa: PLC0415

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not importable")
    try:
        from sparsedoctor_kernels import _C  # noqa: PLC0415

        print(f"extension: {_C.build_info()}")
    except ImportError as error:
        print(f"extension: not built ({error})")
    print(f"commit {os.environ.get('SPARSEDOCTOR_COMMIT', '-')}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=570.0,
                        help="wall time for every stage together (default 570, for a 600 s call; less when the "
                             "lease has less left)")
    parser.add_argument("--stages", nargs="+", help="run only these stages, in the session's order")
    parser.add_argument("--skip", nargs="+", default=[], help="leave these stages out (those an earlier lease ran)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(os.environ.get("OUT", "gpu-run")))
    parser.add_argument("--work", type=pathlib.Path, default=None,
                        help="where the logs, ncu CSVs and Triton cache go (default: a new temporary directory)")
    parser.add_argument("--commit", default=os.environ.get("SPARSEDOCTOR_COMMIT"),
                        help="the commit the tree is at (the device's copy has no .git)")
    parser.add_argument("--list", action="store_true", help="print the stages and exit")
    parser.add_argument("--describe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.describe:
        return describe()
    names = [stage.name for stage in session_stages(pathlib.Path("<work>"))]
    unknown = sorted(set(args.stages or []) - set(names) | set(args.skip) - set(names))
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(names)}")
    chosen = [n for n in names if (args.stages is None or n in args.stages) and n not in args.skip]
    if not chosen:
        parser.error("no stage left to run")
    if args.list:
        for stage in session_stages(args.work or pathlib.Path("<work>")):
            if stage.name in chosen:
                print(f"{stage.name:26s} cap {stage.cap_s:4.0f} s  {stage.purpose}\n{'':26s} $ "
                      f"{' '.join(stage.command)}")
        return 0
    if args.commit:
        os.environ["SPARSEDOCTOR_COMMIT"] = args.commit
    work = args.work or pathlib.Path(tempfile.mkdtemp(prefix="gpu-session-"))
    stages = [stage for stage in session_stages(work) if stage.name in chosen]
    previous = {sig: signal.signal(sig, _stop_session) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        outcomes = run_session(stages, args.budget_s, work, args.out)
    except SessionStopped as stop:
        print(f"\nthe session was stopped ({stop}); what finished is in {args.out}")
        outcomes = None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary = args.out / "summary.md"
    print("\n" + (summary.read_text() if summary.is_file() else "no stage finished: no summary"))
    return 0 if outcomes and all(outcome.status == "ok" for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
