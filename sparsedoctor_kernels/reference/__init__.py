"""Readable pure-PyTorch implementations of the ops (the four of the method and `group_infonce`): the `backend="torch"`
path and the oracle every other backend is tested against. Forward and backward are written out explicitly (no
autograd inside) so that the same autograd.Function serves every backend. No function here synchronises with the
host."""

from sparsedoctor_kernels.reference import (
    group_infonce,
    infonce,
    lora_moe,
    lora_moe_dense,
    queue,
    routing,
    sibling_lora_moe,
)

__all__ = ["group_infonce", "infonce", "lora_moe", "lora_moe_dense", "queue", "routing", "sibling_lora_moe"]
