"""The benchmark scripts run on CPU and write well-formed rows (their numbers are not checked: speed is
measured, never asserted).

Only what a row must hold on any machine is checked, however loaded: the columns, timings that parse as finite
non-negative floats in quantile order, and the derived rates agreeing with the timings and the bytes model up to
the CSV's rounding. A rate may round to 0 on a busy machine, so none is required to be positive."""

import csv
import math

import pytest
import torch

from sparsedoctor_kernels.bench import harness as _harness
from sparsedoctor_kernels.bench import infonce as bench_infonce
from sparsedoctor_kernels.bench import lora_moe as bench_lora_moe
from sparsedoctor_kernels.bench import queue as bench_queue
from sparsedoctor_kernels.bench import route as bench_route


def _rows(path):
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == _harness.CSV_COLUMNS
        return list(reader)


def _number(row, column):
    """A measured column: parseable, finite and non-negative (a slow machine may round it to 0)."""
    value = float(row[column])
    assert math.isfinite(value) and value >= 0, (column, row)
    return value


def _assert_timings(row):
    p20, p50, p80 = (_number(row, column) for column in ("ms_p20", "ms_p50", "ms_p80"))
    assert p20 <= p50 <= p80, row
    peak = float(row["peak_mem_mb"])  # NaN where it is not measured (CPU)
    assert math.isnan(peak) or (math.isfinite(peak) and peak >= 0), row


def _assert_rate(row, column, amount, scale, digits):
    """`column` = round(amount / (ms_p50 * 1e-3) / scale, digits), ms_p50 itself being rounded to 5 digits."""
    rate, ms = _number(row, column), float(row["ms_p50"])
    if ms < 1e-5:  # below the CSV's resolution of ms_p50: nothing to compare against
        return
    slack = 0.5 * 10 ** -digits * (1 + 1e-9)
    low, high = (amount / ((ms + sign * 5e-6) * 1e-3) / scale for sign in (1, -1))
    assert low - slack <= rate <= high + slack, (column, amount, row)


def _assert_bandwidth(row, moved_bytes):
    assert moved_bytes > 0
    _assert_rate(row, "gbps", moved_bytes, 1e9, 2)


def test_lora_moe_benchmark_script_writes_rows(tmp_path, capsys):
    out = tmp_path / "cpu.csv"
    assert bench_lora_moe.main(["--device", "cpu", "--shapes", "k_proj", "--tokens", "33", "--configs", "4,2,3",
                                "--rep-ms", "1", "--out", str(out)]) == 0
    rows = _rows(out)
    impls = {"torch", "naive", "dense", "lora", "base"}
    assert {(r["op"], r["impl"], r["mode"]) for r in rows} == {
        (op, impl, mode) for op in ("lora_moe", "lora_moe_layer") for impl in impls for mode in ("fwd", "bwd", "full")}
    d_in, d_out = (size // bench_lora_moe.CPU_SHRINK for size in bench_lora_moe.QWEN3_4B_SHAPES["k_proj"])
    for row in rows:
        assert row["shape"] == "k_proj" and row["T"] == "33" and (row["E"], row["k"], row["r"]) == ("4", "2", "3")
        assert row["dtype"] == "float32" and row["device"].startswith("cpu") and row["tokens_per_s"] == ""
        _assert_timings(row)
        design = bench_lora_moe.design_of(row["impl"], (33, d_in, d_out, 4, 2, 3), torch.float32, torch.device("cpu"))
        assert design == {"torch": "grouped", "naive": "grouped", "dense": "dense"}.get(row["impl"])
        _assert_bandwidth(row, bench_lora_moe.ideal_bytes(row["impl"], row["mode"], 33, d_in, d_out, 4, 2, 3, 4,
                                                          row["op"] == "lora_moe_layer", design))
    assert "lora_moe summary" in capsys.readouterr().out

    # A rerun replaces its own rows and keeps everyone else's.
    with out.open("a", newline="") as handle:
        csv.DictWriter(handle, fieldnames=_harness.CSV_COLUMNS).writerow(dict(rows[0], device="another-gpu"))
    bench_lora_moe.main(["--device", "cpu", "--shapes", "k_proj", "--tokens", "33", "--configs", "4,2,3",
                         "--impls", "base", "--modes", "fwd", "--rep-ms", "1", "--out", str(out)])
    again = _rows(out)
    assert len(again) == len(rows) + 1
    assert sum(r["device"] == "another-gpu" for r in again) == 1


def test_route_benchmark_script_writes_rows(tmp_path):
    out = tmp_path / "cpu.csv"
    assert bench_route.main(["--device", "cpu", "--tokens", "17", "--modes", "fwd", "full", "--rep-ms", "1",
                             "--out", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 2 * 2 * len(bench_route.EXPERTS_AND_TOP_K)
    assert {r["impl"] for r in rows} == {"torch", "naive"} and {r["shape"] for r in rows} == {"-"}
    assert {(r["E"], r["k"], r["mode"]) for r in rows} == {
        (str(e), str(k), mode) for e, k in bench_route.EXPERTS_AND_TOP_K for mode in ("fwd", "full")}
    for row in rows:
        _assert_timings(row)
        _assert_bandwidth(row, bench_route.ideal_bytes(row["mode"], 17, int(row["E"]), int(row["k"]), 4))


def test_results_file_is_named_after_the_device():
    import torch

    assert _harness.results_path(torch.device("cpu")).name.startswith("cpu-")


@pytest.mark.parametrize("design", ["grouped", "dense", None])
@pytest.mark.parametrize("quantity", ["fwd", "bwd", "full", "full+graph"])
def test_ideal_bytes_grow_with_work(quantity, design):
    impl = "lora" if design is None else "triton"
    small = bench_lora_moe.ideal_bytes(impl, quantity, 10, 8, 8, 2, 1, 2, 2, False, design)
    large = bench_lora_moe.ideal_bytes(impl, quantity, 20, 8, 8, 2, 1, 2, 2, False, design)
    assert large > small > 0


def test_queue_and_infonce_benchmark_scripts_write_rows(tmp_path):
    out = tmp_path / "cpu.csv"
    assert bench_queue.main(["--device", "cpu", "--tokens", "40", "--rep-ms", "1", "--out", str(out)]) == 0
    assert bench_infonce.main(["--device", "cpu", "--tokens", "9", "--modes", "fwd", "full", "--rep-ms", "1",
                               "--out", str(out)]) == 0
    rows = _rows(out)
    queue_rows = [r for r in rows if r["op"] == "queue"]
    assert {r["impl"] for r in queue_rows} == {"torch", "naive"} and {r["mode"] for r in queue_rows} == {"fwd"}
    assert len(queue_rows) == 2 * len(bench_queue.EXPERTS) * len(bench_queue.CPU_CAPACITIES)
    infonce_rows = [r for r in rows if r["op"] == "infonce"]
    expected = {(impl, mode) for impl in ("torch", "naive") for mode in ("fwd", "full")}
    assert {(r["impl"], r["mode"]) for r in infonce_rows} == expected
    assert all(r["shape"].startswith("Q=") and r["T"] in ("40", "9") for r in queue_rows + infonce_rows)
    for row in queue_rows + infonce_rows:
        _assert_timings(row)
        _number(row, "gbps")


@pytest.mark.slow
def test_bench_command_quick_runs_the_step_and_writes_plots(tmp_path, capsys):
    from sparsedoctor_kernels import cli

    out = tmp_path / "bench"
    assert cli.main(["bench", "--quick", "--ops", "queue,step", "--out", str(out), "--device", "cpu"]) == 0
    (csv_path,) = out.glob("*.csv")
    rows = _rows(csv_path)
    steps = [r for r in rows if r["op"] == "step"]
    assert {r["impl"] for r in steps} == {"base", "lora", "naive", "dense", "sparsedoctor"}
    assert all(r["mode"] == "full" and r["gbps"] == "" for r in steps)
    for row in steps:
        _assert_timings(row)
        _assert_rate(row, "tokens_per_s", int(row["T"]), 1, 1)
    assert {r["op"] for r in rows} == {"queue", "step"}
    for row in rows:
        _assert_timings(row)
    assert (out / "bench_speedup.png").read_bytes()[:4] == b"\x89PNG"
    assert "training step summary" in capsys.readouterr().out
    assert cli.main(["bench", "--ops", "nothing", "--out", str(out)]) == 2


def test_headline_script_keeps_its_block(tmp_path, monkeypatch):
    import importlib.util
    import pathlib

    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "headline.py"
    spec = importlib.util.spec_from_file_location("headline", script)
    headline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(headline)
    (tmp_path / "results").mkdir()
    monkeypatch.setattr(headline, "HERE", tmp_path)
    assert "No GPU results" in headline.headline()
    row = {c: "" for c in _harness.CSV_COLUMNS}
    rows = [dict(row, op="step", impl=impl, shape="L=4,seq=2048", T="4096", E="8", mode="full", device="H100",
                 tokens_per_s=str(speed)) for impl, speed in (("sparsedoctor", 300), ("naive", 100))]
    _harness.write_rows(tmp_path / "results" / "nvidia-h100.csv", rows)
    (tmp_path / "README.md").write_text(f"x\n{headline.BEGIN}\nold\n{headline.END}\ny\n")
    headline.main()
    text = (tmp_path / "README.md").read_text()
    assert "| H100 | step L=4,seq=2048 T=4096 (tokens/s) | 300 | 100 |" in text and "old" not in text


def test_a_benchmark_stopped_part_way_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """A time limit stops a script with SIGTERM: the rows measured before it are written, not lost."""
    import argparse
    import os
    import signal

    measured = []

    def run(args):
        for index in range(3):
            row = {column: "-" for column in _harness.CSV_COLUMNS}
            row.update(op="lora_moe", impl=f"impl{index}", shape="s", mode="fwd", device="cpu")
            measured.append(row)
            _harness.echo(row)
        os.kill(os.getpid(), signal.SIGTERM)  # as the session's time limit does
        raise AssertionError("SIGTERM must stop the script before this")

    out = tmp_path / "stopped.csv"
    args = argparse.Namespace(device="cpu", out=out)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        _harness.run_script(args, run, summarize=lambda rows, bandwidth: None)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is the script's alone
    assert [row["impl"] for row in _rows(out)] == ["impl0", "impl1", "impl2"]

    def fails(args):
        _harness.echo(dict(measured[0], impl="before-the-error"))
        raise RuntimeError("CUDA error: an illegal memory access")

    with pytest.raises(RuntimeError):
        _harness.run_script(args, fails, summarize=lambda rows, bandwidth: None)
    assert [row["impl"] for row in _rows(out)] == ["impl0", "impl1", "impl2", "before-the-error"]


def test_sibling_benchmark_script_writes_rows(tmp_path):
    from sparsedoctor_kernels.bench import sibling_lora_moe as bench_siblings

    out = tmp_path / "cpu.csv"
    assert bench_siblings.main(["--device", "cpu", "--tokens", "19", "--modes", "full", "--rep-ms", "1",
                                "--out", str(out)]) == 0
    rows = _rows(out)
    assert {(r["impl"], r["shape"].split(":")[0]) for r in rows} == {
        (impl, group) for impl in ("siblings", "separate") for group in bench_siblings.CPU_GROUPS}
    for row in rows:
        _assert_timings(row)
