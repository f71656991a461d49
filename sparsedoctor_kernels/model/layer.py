"""LoraMoELinear: a frozen nn.Linear plus E LoRA experts behind a router, a projection head and an expert queue.

    y = W x + s * sum_j g_j B_ej A_ej dropout(x)      (route + lora_moe, the delta added into W x in place)

In training it also computes the contrastive term on a random subset of at most `contrastive_tokens` real
(non-padding) tokens: the routed view (the top-1 expert's own LoRA output) against the fused view (the gate-
weighted top-k output), both through the projection head, with the other experts' queued routed views as
negatives. Only public ops are used here; the backends are the ops' business.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels.model.config import SparseDoctorConfig
from sparsedoctor_kernels.model.loss import Row, stack_rows

ROUTER_INIT_STD = 0.02


class ForwardContext:
    """What one wrapper forward shares with its layers. `recording` is on during the wrapper's own forward
    and off during a gradient-checkpointing recomputation, which must compute the same tensors but must not
    record losses or stage queue rows a second time."""

    def __init__(self):
        self.token_mask: torch.Tensor | None = None  # [batch * seq] bool: True for real tokens
        self.recording = False
        # Off while the caller wants the outputs alone (generation: no labels, no training): the layers then skip
        # the routing statistics and the balance loss, and decode through one fused inference call.
        self.wants_losses = True
        # On while a caller measures specialisation: every layer keeps each forward's router probabilities and
        # top-1 experts (detached) in `collected_routing`, until the caller clears them.
        self.collect_routing = False
        # Each recording module's routing statistics (counts, probs_mean, real tokens), the first two as its Row of
        # the tensors it was routed in: the balance term of all of them is one expression in the wrapper
        # (model.loss.balance_loss).
        self.balance_terms: list[tuple[Row, Row, torch.Tensor | int]] = []
        self.contrastive_terms: list[torch.Tensor] = []  # 0-d per module, or [modules] for a batch of them
        # The router mode's inputs, (router logits [T, E], sequence length, picked tokens, temperature) per module:
        # `stop` computes every module's term from them at once (`router_terms`).
        self.router_records: list[tuple[Row, int, int, float]] = []
        self._real_tokens: torch.Tensor | None = None
        self._picked_weights: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._dropped: tuple[torch.Tensor, tuple, torch.Tensor] | None = None  # (input, key, dropout of it)
        self.sibling_groups: list = []  # the model's SiblingGroups: their pending results end with each forward

    def start(self, token_mask: torch.Tensor | None, wants_losses: bool = True) -> None:
        self.token_mask, self.recording, self.wants_losses = token_mask, True, wants_losses
        self.balance_terms, self.contrastive_terms, self.router_records = [], [], []
        # Per-forward constants every layer shares: computed once here (or on first use), not once per module.
        self._real_tokens = None if token_mask is None else token_mask.sum()
        self._picked_weights = {}
        self._dropped = None
        self._clear_groups()

    def _clear_groups(self) -> None:
        for group in self.sibling_groups:
            group.clear()

    def dropout(self, x: torch.Tensor, flat: torch.Tensor, dropout: nn.Dropout) -> torch.Tensor:
        """`dropout(flat)` (flat: x as [tokens, features]), once per shared input: sibling projections called on
        the same tensor (q/k/v on the normed hidden state, gate/up on the post-attention one) share one mask and
        one copy kept for the backward, instead of a mask and a copy each. The last input is remembered (and
        kept alive, so its identity cannot be reused) until another comes or the next forward starts; a
        gradient-checkpointing recomputation replays the same sharing, the first sibling's mask from the
        restored random state."""
        if not (dropout.training and dropout.p > 0):
            return flat
        key = (x._version, tuple(flat.shape), flat.dtype, dropout.p)
        if self._dropped is not None and self._dropped[0] is x and self._dropped[1] == key:
            return self._dropped[2]
        # The fused op (one kernel, a 1-byte mask kept for its backward) that F.dropout takes only on GPUs: on
        # CPU F.dropout draws a float mask and multiplies (three launches, a 4-byte mask kept).
        dropped = torch.native_dropout(flat, dropout.p, True)[0]
        self._dropped = (x, key, dropped)
        return dropped

    def real_tokens(self, num_tokens: int) -> torch.Tensor | int:
        """How many of a layer's `num_tokens` tokens are real: all of them unless the mask covers them."""
        mask = self.token_mask
        return self._real_tokens if mask is not None and mask.numel() == num_tokens else num_tokens

    def pick(self, num_tokens: int, count: int, device, problems: int | None = None):
        """(picked [count] token indices, padding [count], weights [count]): a uniform random subset of the real
        tokens, without a host sync: real tokens score in [1, 2) and padding in [0, 1), so the top scores are
        the real tokens first, in random order (`picked_weights`' padding rows and weights rely on that order).
        With `problems`, that many independent subsets at once: picked [problems, count]."""
        scores = torch.rand(num_tokens if problems is None else (problems, num_tokens), device=device)
        mask = self.token_mask
        if mask is not None and mask.numel() == num_tokens:
            scores = scores + mask
        picked = scores.topk(count, sorted=True).indices
        return (picked, *self.picked_weights(num_tokens, count, device))

    def picked_weights(self, num_tokens: int, picked: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(padding [picked] bool, weights [picked] float32) of `picked` of `num_tokens` tokens drawn real tokens
        first (as the layers' random subsets are): row i is padding when i >= the real tokens, and the weights
        average the real rows (all zero when there are none)."""
        key = (num_tokens, picked, torch.device(device))
        if key not in self._picked_weights:
            real = self.real_tokens(num_tokens)
            real = real.to(device) if isinstance(real, torch.Tensor) else torch.tensor(real, device=device)
            padding = torch.arange(picked, device=device) >= real
            weights = (~padding).float() / real.clamp(1, picked).float()
            self._picked_weights[key] = padding, weights
        return self._picked_weights[key]

    def stop(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(balance statistics, contrastive terms) of the forward; the router mode's terms are computed here."""
        if self.router_records:
            self.contrastive_terms.extend(self.router_terms(self.router_records))
        self.recording, self.wants_losses = False, True
        self._dropped = None
        self._clear_groups()
        terms = self.balance_terms, self.contrastive_terms
        self.balance_terms, self.contrastive_terms, self.router_records = [], [], []
        return terms

    def router_terms(self, records: list[tuple[Row, int, int, float]]) -> list[torch.Tensor]:
        """`contrastive_mode="router"`: InfoNCE at the router's distribution, for every recording module at once.
        A picked token's routing probabilities are the query, the mean routing of the other picked tokens of
        its sequence the positive, the mean routing of the batch's other sequences the negatives (in-batch; no
        queue, no heads). Each module draws its own random subset of the real tokens, as it would alone; the
        modules' logits are stacked, so the draw, the gather of the picked rows, the softmax and `group_infonce`
        (the sequences as groups, the padding rows in none) are one launch each for all of them, not per module.
        Returns one [modules] tensor per kind of record (one kind in a model: same tokens, experts, settings)."""
        kinds: dict[tuple, list[Row]] = {}
        for logits, sequence_length, count, temperature in records:
            source = logits.source
            key = (tuple(source.shape[-2:]), source.dtype, source.device, sequence_length, count, temperature)
            kinds.setdefault(key, []).append(logits)
        terms = []
        for (shape, _, device, sequence_length, count, temperature), logits in kinds.items():
            num_tokens, num_experts = shape
            logits = stack_rows(logits)  # [modules, T, E]
            picked, padding, _ = self.pick(num_tokens, count, device, problems=logits.shape[0])
            rows = logits.gather(1, picked[..., None].expand(-1, -1, num_experts))  # [modules, n, E]
            # float32 at least (float64 stays): chosen in Python, not by torch.promote_types, which dispatches.
            dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
            sequence = torch.div(picked, sequence_length, rounding_mode="floor").masked_fill(padding, -1)
            terms.append(sdk.group_infonce(torch.softmax(rows.to(dtype), dim=-1), sequence,
                                           -(-num_tokens // sequence_length), temperature=temperature))
        return terms


class LoraMoELinear(nn.Module):
    # The benchmarks' alternatives replace `_route` and `_experts` (and set `groups_siblings` and `fused_inference`
    # False): the fused inference call and the group's pass (`routed_sibling_lora_moe`, which every projection
    # takes, o_proj and down_proj as groups of one) call neither.
    fused_inference = True
    groups_siblings = True

    def __init__(self, base: nn.Linear, config: SparseDoctorConfig, context: ForwardContext):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.config = config
        self.context = context
        num_experts, rank = config.num_experts, config.r
        d_in, d_out = base.in_features, base.out_features
        device = base.weight.device
        # Adapter parameters start float32; each forward casts them to the frozen layer's compute dtype, so
        # autocast and `model.to(dtype)` (which casts them with the base) both work.
        self.router = nn.Parameter(torch.randn(num_experts, d_in, device=device) * ROUTER_INIT_STD)
        self.lora_a = nn.Parameter(torch.empty(num_experts, rank, d_in, device=device))
        for expert in range(num_experts):  # PEFT's LoRA A initialisation, per expert
            nn.init.kaiming_uniform_(self.lora_a.data[expert], a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(num_experts, d_out, rank, device=device))  # delta = 0 at init
        self.head = nn.Linear(d_out, config.proj_dim, device=device)
        if config.contrastive_mode == "router" or not config.computes_contrastive:
            # No views to project: a trainable head would get no gradient, which DDP refuses (unused parameters).
            self.head.requires_grad_(False)
        self.queue = sdk.ExpertQueue(num_experts, config.queue_size, config.proj_dim, device=device)
        self.dropout = nn.Dropout(config.lora_dropout)
        self._staged: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._slot_weights: dict[tuple, torch.Tensor] = {}  # _first_slot_weights' constants
        self.last_load: torch.Tensor | None = None  # [E] real tokens' pairs per expert in the last forward
        self.collected_routing: list[tuple[torch.Tensor, torch.Tensor]] = []  # (probs [T, E], top-1 [T])
        self.siblings = None  # the SiblingGroup of projections that read this one's input, set by the wrapper

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.base.in_features}, out_features={self.base.out_features}, "
                f"num_experts={c.num_experts}, top_k={c.top_k}, r={c.r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        num_tokens = flat.shape[0]
        if self._output_only():
            out = self.base(flat)
            dtype = out.dtype  # under autocast the frozen layer decides the compute dtype
            out = sdk.routed_lora_moe(flat.to(dtype), self.router.to(dtype), self.lora_a.to(dtype),
                                      self.lora_b.to(dtype), self.config.top_k, scaling=self.config.scaling, out=out,
                                      validate=False)  # out is the frozen layer's fresh output
            return out.reshape(*lead, out.shape[-1])
        mask = self._token_mask(num_tokens)
        views = None
        if self._in_group(num_tokens):
            # The group's first call computed this member too, from one pass over the shared input.
            grouped = self.siblings.result(self, x, flat)
            out, router_logits, routing, adapter_in = (grouped.out, grouped.router_logits, grouped.routing,
                                                       grouped.adapter_in)
            # Loss terms record the member's row of the group's batched tensors (one gradient path for all).
            recorded_logits, recorded = Row(grouped.batch_logits, grouped.row), grouped.batch_routing
            dtype = out.dtype
        else:
            out = self.base(flat)
            dtype = out.dtype
            flat = flat.to(dtype)
            router_logits = flat @ self.router.to(dtype).T
            routing = self._route(router_logits, mask)  # counts and probability means over real tokens only
            adapter_in = self.context.dropout(x, flat, self.dropout)
            out, views = self._apply_experts(adapter_in, routing, mask, out)
            recorded_logits, recorded = Row(router_logits), routing
        row = recorded_logits.row
        contrastive = None
        if self.training and self.config.computes_contrastive:
            sequence_length = lead[-1] if len(lead) >= 2 else num_tokens  # [batch, seq, d]: one sequence a row
            if self.config.contrastive_mode == "router":
                self._record_router_logits(recorded_logits, sequence_length)
            else:
                contrastive = self._contrastive(adapter_in, self.lora_a.to(dtype), self.lora_b.to(dtype), routing, mask,
                                                sequence_length, views)
        if self.context.collect_routing:
            self.collected_routing.append((torch.softmax(router_logits.detach().float(), dim=-1),
                                           routing.experts[:, 0].detach()))
        if self.context.recording:
            self.last_load = routing.counts.detach()
            self.context.balance_terms.append((Row(recorded.counts, row), Row(recorded.probs_mean, row),
                                               self.context.real_tokens(num_tokens)))
            if contrastive is not None:
                self.context.contrastive_terms.append(contrastive)
        return out.reshape(*lead, out.shape[-1])

    def _apply_experts(self, adapter_in, routing, mask, out):
        """(out with the experts added, the contrastive views of the call or None)."""
        lora_a, lora_b = self.lora_a.to(out.dtype), self.lora_b.to(out.dtype)
        if not self._views_from_the_call(adapter_in.shape[0]):
            return self._experts(adapter_in, lora_a, lora_b, routing.weights, routing.experts, out=out), None
        # The contrastive views come out of the layer's own call: its rank-space rows regated (the picked tokens'
        # routed and fused gates), so the views cost one more expand, not a second read of x.
        picked = self._pick(adapter_in.shape[0], adapter_in.device)
        gates = self._view_gates(routing, picked[0])
        out, view_rows = self._experts_and_views(adapter_in, lora_a, lora_b, routing.weights, routing.experts, out,
                                                 gates)
        return out, (picked, view_rows, gates[2])

    def _output_only(self) -> bool:
        """Nothing but the output is wanted (generation): no gradient, no dropout, no loss recorded, no routing
        collected. Then route and experts are one `routed_lora_moe` call, which on CPU decodes without the
        routing statistics."""
        context = self.context
        return (self.fused_inference and not self.training and not torch.is_grad_enabled()
                and not context.collect_routing and not (context.recording and context.wants_losses))

    def _in_group(self, num_tokens: int) -> bool:
        """Whether this call takes its output from its sibling group's shared pass: the views of the two-view
        term come out of a member's own call (regated rows), so that case computes alone."""
        return (self.siblings is not None and self.groups_siblings and self.siblings.applies()
                and not self._views_from_the_call(num_tokens))

    def wants_adapter_input(self) -> bool:
        """Whether a training call needs the experts' dropped-out input itself (the two-view modes' views, when
        computed as a call of their own); otherwise the dropout may happen inside the fused op."""
        c = self.config
        return self.training and c.computes_contrastive and c.contrastive_mode != "router"

    def _token_mask(self, num_tokens: int) -> torch.Tensor | None:
        mask = self.context.token_mask
        return mask if mask is not None and mask.numel() == num_tokens else None

    def _views_from_the_call(self, num_tokens: int) -> bool:
        """Whether the views are regated rows of the layer's call: in training with the two-view term, unless
        only the router may learn from it (then the views see detached experts, which one call cannot give)."""
        c = self.config
        return (self.training and c.computes_contrastive and num_tokens > 0 and c.contrastive_mode != "router"
                and c.contrastive_updates == "all")

    def _contrastive(self, adapter_in, lora_a, lora_b, routing, mask, sequence_length: int,
                     views=None) -> torch.Tensor:
        num_tokens = adapter_in.shape[0]
        if min(self.config.contrastive_tokens, num_tokens) == 0:
            return adapter_in.new_zeros((), dtype=torch.float32)
        if views is None:
            picked, padding, real_weights = self._pick(num_tokens, adapter_in.device)
            view_rows, view_experts = self._separate_views(adapter_in, lora_a, lora_b, routing, picked)
        else:
            (picked, padding, real_weights), view_rows, view_experts = views
        count = picked.shape[0]
        query, positive = self._project(view_rows).view(2, count, -1).unbind(0)
        top1 = view_experts[:count, 0]
        if self.config.contrastive_mode == "sequence":
            positive, real_weights = self._sequence_positive(positive, picked, padding, sequence_length, num_tokens)
        query_experts = top1.masked_fill(padding, -1)  # -1: padding, never enqueued
        rows = self._contrastive_rows(query, positive, query_experts)
        if self.context.recording:
            # In the queue's dtype (under autocast the head's output is bf16, the queue float32); normalised
            # when committed, once for everything staged.
            self._staged.append((query.detach().to(self.queue.keys.dtype), query_experts))
        return torch.dot(rows, real_weights.to(rows.dtype))

    def _pick(self, num_tokens: int, device):
        """(picked [n], padding [n], weights [n]): the context's random subset of the real tokens."""
        return self.context.pick(num_tokens, min(self.config.contrastive_tokens, num_tokens), device)

    def _record_router_logits(self, router_logits: Row, sequence_length: int) -> None:
        """The router mode's term is the context's, for every module at once (`ForwardContext.router_terms`):
        a module records its logits, only in the wrapper's own forward (not in a checkpoint's recomputation)."""
        if self.context.recording:
            count = min(self.config.contrastive_tokens, router_logits.source.shape[-2])
            self.context.router_records.append((router_logits, sequence_length, count, self.config.temperature))

    @staticmethod
    def _sequence_sums(values, picked, padding, sequence_length: int, num_tokens: int):
        """(sequence id [n], per-sequence sums of the real rows' values [S, d], real rows per sequence [S])."""
        real_values = values.masked_fill(padding[:, None], 0.0)  # not a product: padding may hold anything, NaN too
        sequence = torch.div(picked, sequence_length, rounding_mode="floor")
        num_sequences = -(-num_tokens // sequence_length)
        sums = values.new_zeros(num_sequences, values.shape[1]).index_add(0, sequence, real_values)
        counts = values.new_zeros(num_sequences).index_add(0, sequence, (~padding).to(values.dtype))
        return sequence, sums, counts

    @staticmethod
    def _leave_one_out(values, padding, sequence, sums, counts):
        """(each real row's mean of the other real rows of its sequence, weights averaging the rows that have
        one)."""
        real = (~padding).to(values.dtype)
        others = counts[sequence] - real
        positive = (sums[sequence] - values.masked_fill(padding[:, None], 0.0)) / others.clamp_min(1)[:, None]
        has_partner = real * (others > 0)
        return positive, has_partner / has_partner.sum().clamp_min(1)

    @classmethod
    def _sequence_positive(cls, fused, picked, padding, sequence_length: int, num_tokens: int):
        """`contrastive_mode="sequence"`: each picked token's positive is the mean fused view of the other picked
        real tokens of its sequence (leave-one-out), so the term pulls a token's routed view towards what the
        rest of its sequence routes to, not towards a view that contains itself. Returns (positives, weights
        averaging the real rows that have a partner)."""
        sequence, sums, counts = cls._sequence_sums(fused, picked, padding, sequence_length, num_tokens)
        return cls._leave_one_out(fused, padding, sequence, sums, counts)

    def _view_gates(self, routing, picked):
        """(rows, weights, experts) regating each picked token twice: first its routed view (the top-1 expert's
        own output: slot 0 at weight 1, the other slots at weight 0), then its fused view (the gate-weighted
        top-k output)."""
        twice = picked.repeat(2)
        weights = torch.cat([self._first_slot_weights(routing.weights).expand(picked.shape[0], -1),
                             routing.weights[picked]])
        return twice, weights, routing.experts[twice]

    def _separate_views(self, tokens, lora_a, lora_b, routing, picked):
        """The views as a call of their own, for `contrastive_updates="router"`: only the gates (the router) and
        the heads learn from them."""
        rows, weights, experts = self._view_gates(routing, picked)
        return self._experts(tokens.detach()[rows], lora_a.detach(), lora_b.detach(), weights, experts), experts

    def _first_slot_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """[1, k]: 1 for slot 0, 0 for the others; made once per device and dtype (no launches per forward)."""
        key = (weights.device, weights.dtype, weights.shape[1])
        cached = self._slot_weights.get(key)
        if cached is None:
            cached = torch.zeros(1, weights.shape[1], device=weights.device, dtype=weights.dtype)
            cached[0, 0] = 1.0
            self._slot_weights[key] = cached
        return cached

    def _project(self, views: torch.Tensor) -> torch.Tensor:
        """The projection head in its own parameters' dtype (the views come in the compute dtype)."""
        return self.head(views.to(self.head.weight.dtype))

    @torch.no_grad()
    def commit_queue(self) -> None:
        """Write the routed views staged by earlier forwards into the queue (all ranks' under distributed).

        Under an initialised process group this is a collective: every rank must call it, and it gathers
        exactly once whatever each rank staged (possibly nothing), so ranks never disagree on the number of
        all-gathers. The rows are written in staging order, as one enqueue per staged batch would."""
        if not self.config.computes_contrastive or self.config.queue_size == 0:
            self._staged.clear()  # nothing is ever queued; the same on every rank, so no collective is skipped
            return
        gather = dist.is_available() and dist.is_initialized()
        if not self._staged and not gather:
            return
        keys, experts = self._staged_rows()
        self._enqueue(keys, experts, gather)
        self._staged.clear()

    def _staged_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every staged row in order, normalised, in the queue's current dtype and device (the model may have been
        cast or moved since they were staged)."""
        queue_keys = self.queue.keys
        if not self._staged:
            return (queue_keys.new_empty((0, queue_keys.shape[-1])),
                    torch.empty(0, dtype=torch.long, device=queue_keys.device))
        keys = [k.to(device=queue_keys.device, dtype=queue_keys.dtype) for k, _ in self._staged]
        experts = [e.to(device=queue_keys.device, dtype=torch.long) for _, e in self._staged]
        keys, experts = (torch.cat(keys), torch.cat(experts)) if len(keys) > 1 else (keys[0], experts[0])
        return F.normalize(keys, dim=-1), experts

    # The four ops sit behind these methods so that a benchmark can put the usual alternatives (per-expert
    # loops, dense masking, a materialised InfoNCE) in their place and time the same model.
    def _route(self, router_logits: torch.Tensor, token_mask: torch.Tensor | None) -> sdk.Routing:
        return sdk.route(router_logits, self.config.top_k, token_mask=token_mask)

    def _experts(self, x, lora_a, lora_b, weights, experts, out=None) -> torch.Tensor:
        # The ids come from `route`, always in [0, E): no data-dependent check (a host sync) is needed.
        return sdk.lora_moe(x, lora_a, lora_b, weights, experts, scaling=self.config.scaling, out=out,
                            validate=False)

    def _experts_and_views(self, x, lora_a, lora_b, weights, experts, out, regate):
        """(out with the experts added, the regated rows [m, d_out]) from one call; the rows index x's."""
        return sdk.lora_moe(x, lora_a, lora_b, weights, experts, scaling=self.config.scaling, out=out,
                            regate=regate, validate=False)

    def _experts_then_views(self, x, lora_a, lora_b, weights, experts, out, regate):
        """`_experts_and_views` as two calls of `_experts`, for alternatives that have no regate."""
        rows, rows_weights, rows_experts = regate
        out = self._experts(x, lora_a, lora_b, weights, experts, out=out)
        return out, self._experts(x[rows], lora_a, lora_b, rows_weights, rows_experts)

    def _contrastive_rows(self, query, positive, query_experts) -> torch.Tensor:
        return sdk.infonce_queue_loss(query, positive, self.queue, query_experts,
                                      temperature=self.config.temperature, reduction="none", validate=False)

    def _enqueue(self, keys, experts, gather: bool) -> None:
        self.queue.enqueue(keys, experts, gather=gather, validate=False)
