"""The public ops (the four of the contract, `group_infonce`, `routed_lora_moe` for inference,
`sibling_lora_moe` for projections that share an input and `routed_sibling_lora_moe`, their routers too). Each file
holds argument checks, backend dispatch, the `torch.library` custom ops that the backends implement, and the
autograd.Function tying forward and backward together (`routed_lora_moe` composes two of them)."""

from sparsedoctor_kernels.ops import group_infonce as _group_infonce_module
from sparsedoctor_kernels.ops import infonce, queue, routing
from sparsedoctor_kernels.ops import lora_moe as _lora_moe_module
from sparsedoctor_kernels.ops import sibling_lora_moe as _sibling_lora_moe_module

# op name -> {backend: implementation}, in order of preference on the GPU.
IMPLEMENTATIONS = {
    "route": routing.IMPLEMENTATIONS,
    "lora_moe": _lora_moe_module.IMPLEMENTATIONS,
    "sibling_lora_moe": _sibling_lora_moe_module.IMPLEMENTATIONS,
    "ExpertQueue.enqueue": queue.IMPLEMENTATIONS,
    "infonce_queue_loss": infonce.IMPLEMENTATIONS,
    "group_infonce": _group_infonce_module.IMPLEMENTATIONS,
}

from sparsedoctor_kernels.ops.group_infonce import group_infonce  # noqa: E402
from sparsedoctor_kernels.ops.infonce import infonce_queue_loss  # noqa: E402
from sparsedoctor_kernels.ops.lora_moe import lora_moe  # noqa: E402
from sparsedoctor_kernels.ops.queue import ExpertQueue  # noqa: E402
from sparsedoctor_kernels.ops.routed_lora_moe import routed_lora_moe  # noqa: E402
from sparsedoctor_kernels.ops.routed_sibling_lora_moe import RoutedSiblings, routed_sibling_lora_moe  # noqa: E402
from sparsedoctor_kernels.ops.routing import Routing, load_balance_loss, route  # noqa: E402
from sparsedoctor_kernels.ops.sibling_lora_moe import sibling_lora_moe  # noqa: E402

__all__ = ["IMPLEMENTATIONS", "ExpertQueue", "RoutedSiblings", "Routing", "group_infonce", "infonce_queue_loss",
           "load_balance_loss", "lora_moe", "route", "routed_lora_moe", "routed_sibling_lora_moe", "sibling_lora_moe"]
