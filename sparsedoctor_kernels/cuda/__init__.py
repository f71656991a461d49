"""Launchers of the compiled CUDA extension `sparsedoctor_kernels._C`, one file per op.

Importing these modules loads the extension, which registers its kernels as `torch.ops.sparsedoctor_cuda.*`;
the ops import them lazily, only once `backend="cuda"` was resolved (which checks the extension is built)."""
