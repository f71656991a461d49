"""Wrapper: see sparsedoctor_kernels/bench/step.py (also `sparsedoctor bench --ops step`)."""

import sys

from sparsedoctor_kernels.bench.step import main

if __name__ == "__main__":
    sys.exit(main())
