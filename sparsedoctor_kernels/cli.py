"""The `sparsedoctor` command."""

from __future__ import annotations

import argparse
import sys


def _check(args: argparse.Namespace) -> int:
    import torch

    from sparsedoctor_kernels import __version__
    from sparsedoctor_kernels.check import format_table, run_checks

    print(f"sparsedoctor_kernels {__version__}, torch {torch.__version__}, "
          f"CUDA {'available: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    results = run_checks(args.device, seed=args.seed)
    print(format_table(results))
    failed = [r for r in results if r.passed is False]
    ran = [r for r in results if r.passed is not None]
    print(f"\n{len(ran) - len(failed)} passed, {len(failed)} failed, {len(results) - len(ran)} skipped")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsedoctor", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="run every op on every available backend against the reference")
    check.add_argument("--device", action="append", choices=["cpu", "cuda"],
                       help="device to check (repeatable; default: cpu, and cuda when available)")
    check.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    check.set_defaults(handler=_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
