"""benchmarks/gpu_session.py, the one call a GPU lease gets: stages inside a budget, a hang costs one stage, what
comes back is few plainly named files, and every command it will run on the GPU is one the scripts accept."""

import importlib.util
import io
import math
import os
import re
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"benchmarks_{name}"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


session = _load("gpu_session")


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _quiet(*args, **kwargs):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_stages_run_in_order_and_a_hang_costs_only_its_stage(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    hang = ("import subprocess, time, sys; child = subprocess.Popen(['sleep', '300']); "
            f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(300)")
    stages = [
        session.Stage("first", _python("print('collected'); print('3 passed, 1 skipped in 0.5s')"), cap_s=60),
        session.Stage("hangs", _python(hang), cap_s=3, min_s=0),
        session.Stage("after", _python("print('12 rows written to x.csv')"), cap_s=60),
    ]
    outcomes = session.run_session(stages, budget_s=600, work=tmp_path / "work", out=tmp_path / "out", echo=_quiet)
    assert [(o.name, o.status) for o in outcomes] == [("first", "ok"), ("hangs", "TIMEOUT"), ("after", "ok")]
    assert outcomes[0].result == "3 passed, 1 skipped in 0.5s"
    assert outcomes[2].result == "12 rows written to x.csv"
    assert _wait_dead(int(pid_file.read_text())), "the hung stage's own children must be killed with it"


def _wait_dead(pid: int) -> bool:
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


def test_a_capped_stage_gets_sigint_first_and_what_a_stage_leaves_running_is_stopped(tmp_path):
    """SIGINT first, so pytest prints its failures and a benchmark writes its rows; a finished stage's leftover
    children (compile or test workers) do not outlive it."""
    pid_file = tmp_path / "left.pid"
    polite = ("import signal, sys, time\n"
              "def stop(*_):\n    print('got SIGINT: summary written', flush=True); sys.exit(0)\n"
              "signal.signal(signal.SIGINT, stop)\ntime.sleep(300)")
    leaves = (f"import subprocess; child = subprocess.Popen(['sleep', '300']); "
              f"open({str(pid_file)!r}, 'w').write(str(child.pid)); print('done')")
    stages = [session.Stage("polite", _python(polite), cap_s=3, min_s=0),
              session.Stage("leaves_a_child", _python(leaves), cap_s=60, min_s=0)]
    outcomes = session.run_session(stages, budget_s=600, work=tmp_path / "work", out=tmp_path / "out", echo=_quiet)
    assert [o.status for o in outcomes] == ["TIMEOUT", "ok"]
    assert "got SIGINT: summary written" in (tmp_path / "work" / "logs" / "polite.log").read_text()
    assert _wait_dead(int(pid_file.read_text()))


def test_a_session_told_to_stop_stops_its_stage_and_keeps_the_bundle(tmp_path):
    import signal
    import threading

    pid_file = tmp_path / "grandchild.pid"
    hang = (f"import subprocess, time; child = subprocess.Popen(['sleep', '300']); "
            f"open({str(pid_file)!r}, 'w').write(str(child.pid)); print('working', flush=True); time.sleep(300)")
    stages = [session.Stage("first", _python("print('3 passed in 0.1s')"), cap_s=60, min_s=0),
              session.Stage("hangs", _python(hang), cap_s=300, min_s=0),
              session.Stage("never", _python("print('never')"), cap_s=60, min_s=0)]
    def stop_once_the_stage_runs():
        deadline = time.monotonic() + 60
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # as a time limit stops the session

    previous = signal.signal(signal.SIGTERM, session._stop_session)
    stopper = threading.Thread(target=stop_once_the_stage_runs)
    try:
        stopper.start()
        with pytest.raises(session.SessionStopped):
            session.run_session(stages, budget_s=600, work=tmp_path / "work", out=tmp_path / "out", echo=_quiet)
    finally:
        stopper.join()
        signal.signal(signal.SIGTERM, previous)
    assert _wait_dead(int(pid_file.read_text()))
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| first | ok |" in summary and "| hangs | STOPPED (SessionStopped('SIGTERM')) |" in summary
    assert "| never | not reached |" in summary
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as bundle:
        assert "working" in bundle.extractfile("logs/hangs.log").read().decode()


def test_the_budget_skips_stages_that_cannot_fit_and_missing_tools_skip_theirs(tmp_path):
    stages = [
        session.Stage("fits", _python("print('ok')"), cap_s=60, min_s=0),
        session.Stage("needs_more", _python("print('never')"), cap_s=60, min_s=10_000),
        session.Stage("needs_a_tool", ["no-such-tool-anywhere", "--version"], cap_s=60, min_s=0,
                      needs="no-such-tool-anywhere"),
        session.Stage("fails", _python("import sys; print('boom'); sys.exit(4)"), cap_s=60, min_s=0,
                      fallback=session.Stage("fails_fallback", _python("print('fallback ran')"), cap_s=60,
                                             min_s=0)),
    ]
    outcomes = session.run_session(stages, budget_s=600, work=tmp_path / "work", out=tmp_path / "out", echo=_quiet)
    status = {o.name: o.status for o in outcomes}
    assert status["fits"] == "ok"
    assert status["needs_more"].startswith("skipped: ") and "left" in status["needs_more"]
    assert status["needs_a_tool"] == "skipped: no no-such-tool-anywhere"
    assert status["fails"] == "FAILED (rc 4)"
    assert status["fails_fallback"] == "ok"
    assert [o.name for o in outcomes] == ["fits", "needs_more", "needs_a_tool", "fails", "fails_fallback"]


def test_what_comes_back_is_few_plain_files_holding_every_log(tmp_path):
    stages = [session.Stage(f"stage_{i}", _python(f"print('line of stage {i}')"), cap_s=60, min_s=0)
              for i in range(12)]
    out = tmp_path / "out"
    session.run_session(stages, budget_s=600, work=tmp_path / "work", out=out, echo=_quiet)
    returned = sorted(p for p in out.rglob("*"))
    assert 0 < len(returned) <= 8, returned  # the device tool returns at most 8 files
    assert all(p.is_file() and p.parent == out and re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in returned)
    with tarfile.open(out / "logs.tar.gz") as bundle:
        names = set(bundle.getnames())
        for i in range(12):
            assert f"logs/stage_{i}.log" in names
            text = bundle.extractfile(f"logs/stage_{i}.log").read().decode()
            assert f"line of stage {i}" in text
    summary = (out / "summary.md").read_text()
    for i in range(12):
        assert f"| stage_{i} | ok |" in summary


def test_the_bundle_is_rewritten_after_each_stage(tmp_path):
    """A call killed at its limit still returns what finished: the summary exists before the last stage ends."""
    out = tmp_path / "out"
    probe = f"import pathlib; print('saw', pathlib.Path({str(out / 'summary.md')!r}).read_text().count('| ok |'))"
    stages = [session.Stage("one", _python("print('done')"), cap_s=60, min_s=0),
              session.Stage("probe", _python(probe), cap_s=60, min_s=0)]
    outcomes = session.run_session(stages, budget_s=600, work=tmp_path / "work", out=out, echo=_quiet)
    assert outcomes[1].result == "saw 1"


NCU_COLUMNS = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
               "Grid Size", "Device", "CC", "Section Name", "Metric Name", "Metric Unit", "Metric Value"]


def _ncu_sample() -> str:
    """ncu's --csv layout: its own messages first, then one quoted row per kernel launch and metric."""
    rows = [("0", "_dense_shrink_kernel", "dram__bytes_read.sum", "byte", "42,500,000"),
            ("0", "_dense_shrink_kernel", "dram__bytes_write.sum", "byte", "1,500,000"),
            ("0", "_dense_shrink_kernel", "gpu__time_duration.sum", "nsecond", "11,000"),
            ("1", "_dense_expand_kernel", "dram__bytes_read.sum", "byte", "160000000"),
            ("1", "_dense_expand_kernel", "dram__bytes_write.sum", "byte", "160000000"),
            ("0", "_dense_shrink_kernel", "lts__t_sectors_srcunit_tex_op_read.sum", "sector", "2,000,000"),
            ("0", "_dense_shrink_kernel", "lts__t_sectors_srcunit_tex_op_write.sum", "sector", "50,000"),
            ("1", "_dense_expand_kernel", "gpu__time_duration.sum", "usecond", "80"),
            ("1", "_dense_expand_kernel", "lts__t_sectors_srcunit_tex_op_read.sum", "sector", "6,000,000"),
            ("1", "_dense_expand_kernel", "lts__t_sectors_srcunit_tex_op_write.sum", "sector", "5,000,000"),
            ("2", "a_kernel_without_l2_counts", "dram__bytes_read.sum", "byte", "1000"),
            ("2", "a_kernel_without_l2_counts", "gpu__time_duration.sum", "nsecond", "1000")]
    lines = ["==PROF== Connected to process 4242 (/usr/bin/python3.12)",
             '==PROF== Profiling "_dense_shrink_kernel" - 0: 0%....50%....100% - 1 pass',
             ",".join(f'"{c}"' for c in NCU_COLUMNS)]
    for launch, kernel, metric, unit, value in rows:
        cells = [launch, "4242", "python3.12", "127.0.0.1", kernel, "1", "7", "(128, 1, 1)", "(64, 1, 1)", "0", "9.0",
                 "Command line profiler metrics", metric, unit, value]
        lines.append(",".join(f'"{c}"' for c in cells))
        if metric == "gpu__time_duration.sum" and launch == "0":
            lines.append("==WARNING== a message of ncu's own between two launches")
    return "\n".join(lines) + "\n"


NCU_SAMPLE = _ncu_sample()


def test_ncu_csv_parses_into_launches_and_a_table_against_the_byte_model(tmp_path):
    launches = session.parse_ncu_csv(NCU_SAMPLE)
    assert [launch["name"] for launch in launches] == ["_dense_shrink_kernel", "_dense_expand_kernel",
                                                       "a_kernel_without_l2_counts"]
    shrink, expand, bare = launches
    assert (shrink["dram_read"], shrink["dram_write"], shrink["l2_read"], shrink["l2_write"]) == (
        42.5e6, 1.5e6, 64e6, 1.6e6)
    assert shrink["seconds"] == pytest.approx(11e-6) and expand["seconds"] == pytest.approx(80e-6)
    assert math.isnan(bare["dram_write"]) and math.isnan(bare["l2_read"]) and bare["dram_read"] == 1000
    assert session.parse_ncu_csv("==PROF== nothing profiled\n") == []

    (tmp_path / "logs").mkdir()
    (tmp_path / "ncu_dense.csv").write_text("\n".join(NCU_SAMPLE.splitlines()[:-2]) + "\n")  # shrink, expand
    (tmp_path / "logs" / "ncu_dense.log").write_text("MODEL strategy=dense T=8192 bytes_fwd=200000000 "
                                                     "bytes_bwd=164000000\n")
    table = session.ncu_table(tmp_path)
    assert "| _dense_shrink_kernel | 11.0 | 42.5 | 1.5 | 64.0 | 1.6 | 4000 |" in table
    assert "| _dense_expand_kernel | 80.0 | 160.0 | 160.0 | 192.0 | 160.0 | 4000 |" in table
    assert "2 launches, 91.0 us of kernel time, 364.0 MB of DRAM traffic (4000 GB/s), 417.6 MB between SMs" in table
    assert "the byte model says 364.0 MB (DRAM / model 1.00, L2 / model 1.15)" in table
    (tmp_path / "ncu_grouped.csv").write_text("==ERROR== the profiler could not start\n")
    assert "ncu grouped: no kernel rows parsed" in session.ncu_table(tmp_path)


def _bench_parser(script: str):
    from sparsedoctor_kernels.bench import harness, lora_moe, step

    module = {"bench_lora_moe.py": lora_moe, "bench_step.py": step}[script]
    parser = harness.argument_parser("", [], [])
    module.add_arguments(parser)
    return parser


def test_every_command_of_the_session_names_files_and_arguments_that_exist(tmp_path):
    stages = session.session_stages(tmp_path)
    names = [stage.name for stage in stages]
    assert len(names) == len(set(names))
    assert names[:4] == ["install", "environment", "check", "test_gpu"]  # correctness first
    sanitize = _load("sanitize_ops")
    for stage in stages:
        command = stage.command
        scripts = [part.removeprefix("--ignore=") for part in command if part.endswith(".py")]
        for script in scripts:
            assert (ROOT / script).is_file(), f"{stage.name}: {script}"
        if any(s.endswith(("bench_lora_moe.py", "bench_step.py")) for s in scripts):
            script = Path(scripts[0]).name
            _bench_parser(script).parse_args(command[command.index(scripts[0]) + 1:])
        if "benchmarks/sanitize_ops.py" in command:
            rest = command[command.index("benchmarks/sanitize_ops.py") + 1:]
            assert set(rest[rest.index("--ops") + 1:] if "--ops" in rest else []) <= set(sanitize.OPS)
        for test_file in (part for part in command if part.startswith("tests/test_")):
            assert (ROOT / test_file).is_file()
        if stage.needs:
            assert command[0] == stage.needs
    install = stages[0]
    assert install.env["SPARSEDOCTOR_BUILD_CUDA"] == "1" and install.fallback.env["SPARSEDOCTOR_BUILD_CUDA"] == "0"


def test_profile_script_runs_the_layer_call_and_prints_its_byte_model(capsys):
    import torch

    profile = _load("profile_lora_moe")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the kernels run under the interpreter
    for strategy in ("dense", "grouped"):
        assert profile.main(["--strategy", strategy, "--tokens", "19", "--shrink", "64", "--config", "5,2,3",
                             "--warmup", "1", "--device", device]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("MODEL ")]
    assert len(lines) == 2 and "strategy=dense" in lines[0] and "strategy=grouped" in lines[1]
    assert all("T=19 d_in=40 d_out=152 E=5 k=2 r=3" in line for line in lines)
    assert all(f"dtype={'bfloat16' if device == 'cuda' else 'float32'}" in line for line in lines)


def test_the_command_line_lists_stages_and_refuses_unknown_ones(capsys, tmp_path):
    assert session.main(["--list", "--out", str(tmp_path / "out")]) == 0
    listed = capsys.readouterr().out
    assert "install" in listed and "memcheck" in listed and "ncu_grouped" in listed
    with pytest.raises(SystemExit):
        session.main(["--stages", "no_such_stage", "--out", str(tmp_path / "out")])
    assert "unknown stage(s) no_such_stage" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_landing_a_session_puts_its_csv_logs_and_headline_in_the_tree(tmp_path):
    """What a session brought back lands as results/<device>.csv, its logs beside it, the headline regenerated;
    a bundle member that would leave the logs folder is not written."""
    from sparsedoctor_kernels.bench import harness

    land = _load("land_gpu_session")
    out = tmp_path / "fetched"
    stages = [session.Stage("test_gpu", _python("print('97 passed in 80.0s')"), cap_s=60, min_s=0)]
    session.run_session(stages, budget_s=600, work=tmp_path / "work", out=out, echo=_quiet)
    row = {column: "" for column in harness.CSV_COLUMNS}
    rows = [dict(row, op="lora_moe", impl=impl, shape="gate_proj", T="8192", E="8", k="2", r="16", mode="full",
                 device="NVIDIA H200", ms_p50=ms) for impl, ms in (("triton", "0.5"), ("naive", "2.5"))]
    for stale in out.glob("*.csv"):  # on a GPU machine the bundle copies that machine's real results too
        stale.unlink()
    harness.write_rows(out / "nvidia-h200.csv", rows)
    with tarfile.open(out / "logs.tar.gz") as bundle:
        members = [(m, bundle.extractfile(m).read()) for m in bundle.getmembers() if m.isfile()]
    with tarfile.open(out / "logs.tar.gz", "w:gz") as bundle:  # the same bundle, plus a hostile member
        for member, data in members:
            bundle.addfile(member, io.BytesIO(data))
        evil = tarfile.TarInfo("../../escaped.txt")
        evil.size = 4
        bundle.addfile(evil, io.BytesIO(b"evil"))

    benchmarks = tmp_path / "benchmarks"
    benchmarks.mkdir()
    (benchmarks / "README.md").write_text("before\n<!-- HEADLINE:BEGIN -->\nold\n<!-- HEADLINE:END -->\nafter\n")
    land.land(out, benchmarks)
    results = benchmarks / "results"
    assert (results / "nvidia-h200.csv").read_text() == (out / "nvidia-h200.csv").read_text()
    logs = results / "nvidia-h200-logs"
    assert "97 passed in 80.0s" in (logs / "logs" / "test_gpu.log").read_text()
    assert "| test_gpu | ok |" in (logs / "summary.md").read_text()
    assert not (logs / "results").exists()  # the CSV lands once, in results/
    assert not any(p.name == "escaped.txt" for p in tmp_path.rglob("*"))
    readme = (benchmarks / "README.md").read_text()
    assert "| NVIDIA H200 | lora_moe gate_proj T=8192 E=8 fwd+bwd (ms) | 0.5 | 2.5 |" in readme
    assert "old" not in readme and readme.startswith("before\n") and readme.endswith("after\n")
    with pytest.raises(SystemExit, match="no GPU results CSV"):
        land.land(tmp_path / "work", benchmarks)
