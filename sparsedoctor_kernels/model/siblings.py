"""Sibling groups: the adapted linears of one block that read the same tensor (q/k/v of an attention block on
the normed hidden state, gate/up of an MLP on the post-attention one) computed together.

The block calls its projections one after another on the same input. The first call computes every member:
each frozen layer's output, each router's logits and routing, one dropout of the input, and every member's
experts from one pass over it (`sdk.sibling_lora_moe`); the other members' calls on that same tensor then take
their results. Each member keeps its own router, experts and losses (the method is per linear), and its own
loss terms are still computed by its own call, in call order, so the random draws and the recorded terms are
those of ungrouped calls. A member called on any other tensor computes the group afresh.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import sparsedoctor_kernels as sdk

# Projection names of one block that read one input, as Qwen3 (and Llama-style models) name them.
SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass
class MemberResult:
    """What a member's own call needs from the group's computation of it."""

    out: torch.Tensor  # [tokens, d_out]: frozen output plus the experts
    router_logits: torch.Tensor
    routing: sdk.Routing
    adapter_in: torch.Tensor  # the (dropped-out) input the experts read


class SiblingGroup:
    """The members (LoraMoELinear modules, in the block's call order) and the results computed for the input
    they were last called on. Holds no parameters or buffers: the modules' state dicts are unchanged."""

    def __init__(self, members: list):
        self.members = members
        self.enabled = True
        self._input: tuple[torch.Tensor, int] | None = None
        self._pending: dict[int, MemberResult] = {}

    def applies(self) -> bool:
        # Under torch.compile every member runs its own call (the tensor-identity cache is host-side state).
        return self.enabled and not torch.compiler.is_compiling()

    def clear(self) -> None:
        self._input, self._pending = None, {}

    def result(self, member, x: torch.Tensor, flat: torch.Tensor) -> MemberResult:
        """`member`'s result for input `x` (flat: x as [tokens, features]), computing the whole group unless an
        earlier member's call on this very tensor already did."""
        key = id(member)
        cached = self._input
        if cached is None or cached[0] is not x or cached[1] != x._version or key not in self._pending:
            self._pending = self._compute(x, flat)
            self._input = (x, x._version)
        result = self._pending.pop(key)
        if not self._pending:
            self._input = None  # every member has its result: nothing kept alive
        return result

    def _compute(self, x: torch.Tensor, flat: torch.Tensor) -> dict[int, MemberResult]:
        first = self.members[0]
        outs = [member.base(flat) for member in self.members]
        dtype = outs[0].dtype  # under autocast the frozen layers decide the compute dtype
        flat = flat.to(dtype)
        mask = first._token_mask(flat.shape[0])
        logits = [flat @ member.router.to(dtype).T for member in self.members]
        routings = [member._route(member_logits, mask) for member, member_logits in zip(self.members, logits)]
        adapter_in = first.context.dropout(x, flat, first.dropout)
        outs = sdk.sibling_lora_moe(
            adapter_in, [m.lora_a.to(dtype) for m in self.members], [m.lora_b.to(dtype) for m in self.members],
            [r.weights for r in routings], [r.experts for r in routings], scaling=first.config.scaling, outs=outs,
            validate=False)
        return {id(member): MemberResult(out, member_logits, routing, adapter_in)
                for member, out, member_logits, routing in zip(self.members, outs, logits, routings)}


def find_sibling_groups(model: torch.nn.Module, adapted_type: type) -> list[SiblingGroup]:
    """A group for each block whose adapted children include two or more of one SIBLING_NAMES set, members in
    the set's order (the block's call order)."""
    groups = []
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SIBLING_NAMES:
            members = [children[name] for name in names if isinstance(children.get(name), adapted_type)]
            if len(members) >= 2:
                groups.append(SiblingGroup(members))
    return groups
