"""The torch backend: the ops written as a competent PyTorch user would write them for speed (a few large matmuls,
no per-expert masking), sync-free where they run on CUDA. The readable oracles the tests compare with stay in
`sparsedoctor_kernels.reference`."""

from sparsedoctor_kernels.eager import infonce, lora_moe, lora_moe_dense, routed, routing, sibling_lora_moe

__all__ = ["infonce", "lora_moe", "lora_moe_dense", "routed", "routing", "sibling_lora_moe"]
