"""Wrapper: see sparsedoctor_kernels/bench/sibling_lora_moe.py (also `sparsedoctor bench --ops sibling_lora_moe`)."""

import sys

from sparsedoctor_kernels.bench.sibling_lora_moe import main

if __name__ == "__main__":
    sys.exit(main())
