"""Wrapper: see sparsedoctor_kernels/bench/queue.py (also `sparsedoctor bench --ops queue`)."""

import sys

from sparsedoctor_kernels.bench.queue import main

if __name__ == "__main__":
    sys.exit(main())
