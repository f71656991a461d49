"""The benchmark scripts run on CPU and write well-formed rows (their numbers are not checked: speed is
measured, never asserted)."""

import csv
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _harness  # noqa: E402
import bench_lora_moe  # noqa: E402
import bench_route  # noqa: E402


def _rows(path):
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == _harness.CSV_COLUMNS
        return list(reader)


def test_lora_moe_benchmark_script_writes_rows(tmp_path, capsys):
    out = tmp_path / "cpu.csv"
    assert bench_lora_moe.main(["--device", "cpu", "--shapes", "k_proj", "--tokens", "33", "--configs", "4,2,3",
                                "--rep-ms", "1", "--out", str(out)]) == 0
    rows = _rows(out)
    impls = {"torch", "naive", "dense", "lora", "base"}
    assert {(r["op"], r["impl"], r["mode"]) for r in rows} == {
        (op, impl, mode) for op in ("lora_moe", "lora_moe_layer") for impl in impls for mode in ("fwd", "bwd", "full")}
    for row in rows:
        assert row["shape"] == "k_proj" and row["T"] == "33" and (row["E"], row["k"], row["r"]) == ("4", "2", "3")
        assert 0 < float(row["ms_p20"]) <= float(row["ms_p50"]) <= float(row["ms_p80"])
        assert float(row["gbps"]) > 0 and row["dtype"] == "float32"
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
    assert len(rows) == 2 * len(bench_route.EXPERTS_AND_TOP_K)
    assert {r["impl"] for r in rows} == {"torch"} and {r["shape"] for r in rows} == {"-"}


def test_results_file_is_named_after_the_device():
    import torch

    assert _harness.results_path(torch.device("cpu")).name.startswith("cpu-")


@pytest.mark.parametrize("quantity", ["fwd", "bwd", "full"])
def test_ideal_bytes_grow_with_work(quantity):
    small = bench_lora_moe.ideal_bytes("triton", quantity, 10, 8, 8, 2, 1, 2, 2, False)
    large = bench_lora_moe.ideal_bytes("triton", quantity, 20, 8, 8, 2, 1, 2, 2, False)
    assert large > small > 0


def test_queue_and_infonce_benchmark_scripts_write_rows(tmp_path):
    import bench_infonce
    import bench_queue

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
