import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsedoctor_kernels import cli, reference
from sparsedoctor_kernels.ops import IMPLEMENTATIONS
from sparsedoctor_kernels.testing.check import run_checks

ROOT = Path(__file__).resolve().parents[1]


def test_check_passes_and_prints_a_table(capsys):
    assert cli.main(["check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for op in IMPLEMENTATIONS:
        assert op in out
    assert "PASS" in out and "FAIL" not in out
    assert "passed, 0 failed" in out


def test_check_fails_on_a_wrong_backend(monkeypatch, capsys):
    """The check must catch a backend that computes the wrong function: plug one in as 'torch' that is off
    by 1% in float32 and right in float64 (where the check computes its reference)."""
    real = reference.lora_moe

    def skew(x, scaling):
        return scaling if x.dtype == torch.float64 else scaling * 1.01

    class SkewedLoraMoE:
        @staticmethod
        def forward(x, lora_a, lora_b, weights, experts, scaling):
            return real.forward(x, lora_a, lora_b, weights, experts, skew(x, scaling))

        @staticmethod
        def forward_into(x, lora_a, lora_b, weights, experts, scaling, out):
            return real.forward_into(x, lora_a, lora_b, weights, experts, skew(x, scaling), out)

        backward = staticmethod(real.backward)

    monkeypatch.setitem(IMPLEMENTATIONS["lora_moe"], "torch", SkewedLoraMoE)
    results = [r for r in run_checks(["cpu"]) if r.case == "lora_moe (grouped)" and r.backend == "torch"]
    assert results and all(r.passed is False for r in results)
    assert cli.main(["check", "--device", "cpu"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.slow
def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("sparsedoctor")
    if not exe.exists():
        pytest.skip("package not installed in this interpreter's environment")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "check" in result.stdout


@pytest.mark.parametrize("flag, message", [
    ("1", "SPARSEDOCTOR_BUILD_CUDA=1 but the CUDA extension cannot be built"),
    ("maybe", "SPARSEDOCTOR_BUILD_CUDA must be 0 or 1"),
])
def test_forced_cuda_build_fails_clearly_without_cuda(flag, message):
    if flag == "1" and torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build: the forced build may well succeed")
    env = {**os.environ, "SPARSEDOCTOR_BUILD_CUDA": flag}
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                            text=True)
    assert result.returncode != 0
    assert message in result.stderr


def test_auto_build_skips_the_extension_and_says_why():
    env = {k: v for k, v in os.environ.items() if k != "SPARSEDOCTOR_BUILD_CUDA"}
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "sparsedoctor_kernels"
    if torch.version.cuda is None:
        assert "skipping the optional CUDA extension" in result.stderr


def _train_parser():
    return cli.build_parser()._subparsers._group_actions[0].choices["train"]


def _every_train_flag_with_a_value() -> list[str]:
    argv = []
    for action in _train_parser()._actions:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if flag is None or flag == "--help":
            continue
        if action.nargs == 0:
            argv.append(flag)  # a switch
        elif action.nargs == "+":
            argv += [flag, "first", "second"]
        else:
            argv += [flag, "3"]
    return argv


def test_every_train_flag_passes_through_torchrun():
    """torchrun's parser reads abbreviations of its own flags anywhere on the line (`--r` was an ambiguous
    prefix of `--rdzv-*`, `--role`, `--run-path`, `--redirects`); every train flag must reach the script."""
    from torch.distributed.run import get_args_parser

    flags = _every_train_flag_with_a_value()
    assert {"--lora-r", "--lora-alpha", "--resume", "--overwrite", "--max-length", "--target-modules"} <= set(flags)
    assert "--r" not in flags
    launched = get_args_parser().parse_args(["--nproc-per-node", "2", "-m", "sparsedoctor_kernels.cli", "train",
                                             *flags])
    assert launched.module and launched.training_script == "sparsedoctor_kernels.cli"
    assert launched.training_script_args == ["train", *flags]
    args = cli.build_parser().parse_args(launched.training_script_args)
    assert args.r == 3 and args.lora_alpha == 3 and args.target_modules == ["first", "second"] and args.overwrite


def test_train_flags_are_not_abbreviated():
    """`--r` must not quietly become `--resume` now that the rank flag is `--lora-r`."""
    with pytest.raises(SystemExit):
        _train_parser().parse_args(["--r", "2"])


def test_adapter_flags_take_their_declared_type():
    """`lora_alpha: float = 32`: the flag takes 0.5 (its type is the field's, not its default's)."""
    args = _train_parser().parse_args(["--lora-alpha", "0.5", "--lora-r", "2", "--temperature", "0.1"])
    assert args.lora_alpha == 0.5 and args.r == 2 and isinstance(args.r, int) and args.temperature == 0.1
