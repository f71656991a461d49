"""Launchers of the compiled CUDA extension `sparsedoctor_kernels._C`, one file per op.

Importing these modules loads the extension, which registers its kernels as `torch.ops.sparsedoctor_cuda.*`;
the ops import them lazily, only once `backend="cuda"` was resolved (which checks the extension is built)."""

# Both CUDA kernels hold an expert's state in registers or shared memory sized for this many experts
# (kMaxRouteExperts and kMaxEnqueueExperts in csrc/sparsedoctor_kernels.h).
MAX_EXPERTS = 256
