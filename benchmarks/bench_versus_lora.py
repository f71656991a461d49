"""Wrapper: see sparsedoctor_kernels/bench/versus_lora.py (also `sparsedoctor bench --ops versus_lora`)."""

import sys

from sparsedoctor_kernels.bench.versus_lora import main

if __name__ == "__main__":
    sys.exit(main())
