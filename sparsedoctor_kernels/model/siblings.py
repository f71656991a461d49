"""Sibling groups: the adapted linears of one block that read the same tensor (q/k/v of an attention block on
the normed hidden state, gate/up of an MLP on the post-attention one) computed together.

The block calls its projections one after another on the same input. The first call computes every member:
each frozen layer's output, then every router's logits, their routings and every member's experts from one
`sdk.routed_sibling_lora_moe` call over the input (one dropout mask for all); the other members' calls on that
same tensor then take their results. A projection with no sibling (o_proj, down_proj) is a group of one, so it
takes the same call. Each member keeps its own router, experts
and losses (the method is per linear): its call records its row of the group's batched logits and routing
statistics, in call order, so the loss terms (computed for all modules at once by the wrapper) and the random
draws are those of ungrouped calls, bit for bit on the torch backend. A member called on any other tensor
computes the group afresh.
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
    adapter_in: torch.Tensor | None  # the (dropped-out) input the experts read, when a member asked for it
    batch_logits: torch.Tensor  # [S, tokens, E]: every member's, from one GEMM
    batch_routing: sdk.Routing  # every member's, from one `route` call
    row: int  # the member's place in the group

    @property
    def router_logits(self) -> torch.Tensor:
        return self.batch_logits[self.row]

    @property
    def routing(self) -> sdk.Routing:
        return self.batch_routing.select(self.row)


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
        if first.wants_adapter_input():  # the dropped-out input itself is wanted: dropout outside the op
            adapter_in, dropout = first.context.dropout(x, flat, first.dropout), 0.0
        else:  # dropout inside the op (in the kernels where they take the call): one mask, no copy kept
            adapter_in, dropout = None, (first.dropout.p if first.dropout.training else 0.0)
        # Every member's router logits, routing and experts from one call over the shared input: each member's
        # logits and routing are views of the group's [S, T, E] tensors.
        outs, logits, routing = sdk.routed_sibling_lora_moe(
            flat, [member.router.to(dtype) for member in self.members],
            [member.lora_a.to(dtype) for member in self.members], [member.lora_b.to(dtype) for member in self.members],
            first.config.top_k, scaling=first.config.scaling, dropout=dropout, outs=outs,
            token_mask=first._token_mask(flat.shape[0]), expert_input=adapter_in, validate=False)
        return {id(member): MemberResult(out, adapter_in, logits, routing, s)
                for s, (member, out) in enumerate(zip(self.members, outs))}


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
