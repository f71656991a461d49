"""`python -m sparsedoctor_kernels ...` is the `sparsedoctor` command (for trees run without installing)."""

import sys

from sparsedoctor_kernels.cli import main

sys.exit(main())
