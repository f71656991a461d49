"""`ExpertQueue.enqueue(gather=True)` keeps the queues of all ranks identical (two gloo processes on CPU), and
`sparsedoctor train` under torchrun checkpoints, saves and agrees on its queues."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparsedoctor_kernels as sdk

import brute

pytestmark = pytest.mark.slow  # torchrun and gloo process groups: seconds each

ROWS_PER_RANK = (5, 9)  # ranks bring different numbers of rows


def _batch(rank: int, step: int):
    gen = torch.Generator().manual_seed(100 * step + rank)
    rows = ROWS_PER_RANK[rank] + step
    return torch.randn(rows, 3, generator=gen), torch.randint(-1, 4, (rows,), generator=gen)


def _worker(rank: int, world: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue = sdk.ExpertQueue(4, 6, 3)
        for step in range(3):
            keys, experts = _batch(rank, step)
            queue.enqueue(keys, experts, gather=True, validate=False)
        results[rank] = {name: t.clone() for name, t in queue.state_dict().items()}
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gather_enqueue_gives_identical_queues_in_rank_then_row_order():
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), results), nprocs=world, join=True)
        states = [dict(results[r]) for r in range(world)]

    keys, ptr, size = torch.zeros(4, 6, 3), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    for step in range(3):
        for rank in range(world):  # rank order, then row order
            keys, ptr, size = brute.enqueue(keys, ptr, size, *_batch(rank, step))
    for state in states:
        torch.testing.assert_close(state["keys"].double(), keys, rtol=0, atol=0)
        assert torch.equal(state["ptr"], ptr) and torch.equal(state["size"], size)


# --- `sparsedoctor train` under torchrun ------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_TIMEOUT_S = 600  # generous: only there to turn a hang (a rank left alone in a collective) into a failure


def _torchrun_command() -> list[str]:
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc: torchrun starts each worker in a session of its own, so killing
    torchrun's process group would leave hung workers behind."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:  # "pid (name) state ppid ...", the name possibly holding spaces and parentheses
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        children.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        below = children.get(frontier.pop(), [])
        found += below
        frontier += below
    return found


def _run_to_the_end(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # This checkout's package, whatever is installed; one thread a rank on a small machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = cwd / "torchrun.log"  # a file, not a pipe: a hung worker holding a pipe open would block the reader
    with log.open("w") as output, subprocess.Popen(command, cwd=cwd, env=env, stdout=output,
                                                   stderr=subprocess.STDOUT) as process:
        try:
            process.wait(timeout=TORCHRUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for pid in [*_descendants(process.pid), process.pid]:  # the workers first, while they are findable
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"torchrun did not finish within {TORCHRUN_TIMEOUT_S} s (hung?); its output:\n"
                        f"{log.read_text()}")
    return subprocess.CompletedProcess(command, process.returncode, log.read_text())


def _load_final_adapter(run_dir: Path):
    from transformers import AutoTokenizer

    from sparsedoctor_kernels.model import SparseDoctorConfig, apply_sparsedoctor, load_adapter
    from sparsedoctor_kernels.model.tiny import tiny_qwen3

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    described = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    model = apply_sparsedoctor(tiny_qwen3(vocab_size=len(tokenizer), seed=0),
                               SparseDoctorConfig.from_dict(described["sparsedoctor"]))
    return load_adapter(model, run_dir / "adapter")


def test_torchrun_train_checkpoints_and_saves_the_final_adapter_with_identical_queues(tmp_path):
    pytest.importorskip("transformers")
    from train_helpers import SMALL_FLAGS, metric_steps

    from sparsedoctor_kernels.train.loop import queue_digest

    run_dir = tmp_path / "ddp"
    command = _torchrun_command() + [
        "--standalone", "--nproc-per-node", "2", "-m", "sparsedoctor_kernels.cli", "train",
        "--output-dir", str(run_dir), "--steps", "4", "--save-every", "2", "--device", "cpu", "--batch-size", "2",
        "--max-length", "48", "--no-progress", *SMALL_FLAGS, "--contrastive-mode", "paper"]  # the queues sync
    result = _run_to_the_end(command, tmp_path)
    assert result.returncode == 0, result.stdout

    agreed = re.search(r"expert queues identical on all 2 ranks \(digest ([0-9a-f]{16})\)", result.stdout)
    assert agreed, result.stdout
    assert result.stdout.count("final step: loss") == 1  # rank 0 reports
    assert (run_dir / "latest").read_text().strip() == "checkpoint-4"
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        assert (run_dir / checkpoint / "adapter" / "adapter_model.safetensors").is_file()
        assert (run_dir / checkpoint / "trainer_state.safetensors").is_file()
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith((".tmp", ".partial"))]
    assert metric_steps(run_dir) == [1, 2, 3, 4]

    model = _load_final_adapter(run_dir)
    assert queue_digest(model) == agreed[1]  # the saved queues are the ones both ranks ended with
    assert sum(int(m.queue.size.sum()) for m in model.adapted_modules().values()) > 0


def test_torchrun_resume_is_exact_on_every_rank(tmp_path):
    """Each rank's RNG state is saved and restored: a 2-rank run interrupted after checkpoint-2 and resumed ends
    with the same loss and queues as the uninterrupted run (dropout draws differ between ranks)."""
    pytest.importorskip("transformers")
    import shutil

    def command(run_dir: Path, *extra: str) -> list[str]:
        return _torchrun_command() + [
            "--standalone", "--nproc-per-node", "2", "-m", "sparsedoctor_kernels.cli", "train",
            "--output-dir", str(run_dir), "--steps", "4", "--save-every", "2", "--device", "cpu",
            "--model", "tiny", "--batch-size", "2", "--no-progress", "--num-experts", "3", "--top-k", "2",
            "--lora-r", "2", "--proj-dim", "8", "--queue-size", "16", "--contrastive-tokens", "8",
            "--lora-dropout", "0.5", "--max-length", "48", *extra]

    def outcome(stdout: str) -> tuple[str, str]:
        digest = re.search(r"expert queues identical on all 2 ranks \(digest ([0-9a-f]{16})\)", stdout)
        final = re.search(r"final step: (.*)", stdout)
        assert digest and final, stdout
        return final[1], digest[1]

    whole = tmp_path / "whole"
    result = _run_to_the_end(command(whole), tmp_path)
    assert result.returncode == 0, result.stdout
    interrupted = tmp_path / "interrupted"  # as if killed during step 4: checkpoint-2 is the latest
    shutil.copytree(whole, interrupted)
    for name in ("checkpoint-4", "adapter", "tokenizer"):
        shutil.rmtree(interrupted / name)
    (interrupted / "latest").write_text("checkpoint-2\n")
    resumed = _run_to_the_end(command(interrupted, "--resume"), tmp_path)
    assert resumed.returncode == 0, resumed.stdout
    assert outcome(resumed.stdout) == outcome(result.stdout)
