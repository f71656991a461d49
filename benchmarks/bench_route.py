"""Wrapper: see sparsedoctor_kernels/bench/route.py (also `sparsedoctor bench --ops route`)."""

import sys

from sparsedoctor_kernels.bench.route import main

if __name__ == "__main__":
    sys.exit(main())
