"""Wrapper: see sparsedoctor_kernels/bench/infonce.py (also `sparsedoctor bench --ops infonce`)."""

import sys

from sparsedoctor_kernels.bench.infonce import main

if __name__ == "__main__":
    sys.exit(main())
