"""sparsedoctor_kernels: fused ops for contrastive LoRA mixture-of-experts fine-tuning (SparseDoctor).

The public ops (contract: docs/ops.md): `route`, `Routing`, `load_balance_loss`, `lora_moe`, `ExpertQueue`,
`infonce_queue_loss`, `group_infonce` (the default contrastive term's), `routed_lora_moe` (route + experts
in one call, for inference), `sibling_lora_moe` (the experts of projections that read one input, from one
pass over it) and `routed_sibling_lora_moe` (their routers, routing and experts in one call: a training layer's
adapter pass).
Each takes `backend=` ("torch", "triton", "cuda" or None for automatic).
"""

from sparsedoctor_kernels._backend import BACKENDS
from sparsedoctor_kernels.ops import (
    ExpertQueue,
    RoutedSiblings,
    Routing,
    group_infonce,
    infonce_queue_loss,
    load_balance_loss,
    lora_moe,
    route,
    routed_lora_moe,
    routed_sibling_lora_moe,
    sibling_lora_moe,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ExpertQueue",
    "RoutedSiblings",
    "Routing",
    "__version__",
    "group_infonce",
    "infonce_queue_loss",
    "load_balance_loss",
    "lora_moe",
    "route",
    "routed_lora_moe",
    "routed_sibling_lora_moe",
    "sibling_lora_moe",
]
