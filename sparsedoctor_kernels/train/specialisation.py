"""Expert specialisation metrics: pure functions of labels, router probabilities and counts (no model knowledge).

- `mutual_information(a, b)`: I(A; B) in bits, the plug-in estimate from the contingency table.
- `conditional_mutual_information(a, b, c)`: I(A; B | C) in bits, the same from the three-way table.
- `routing_entropy(probs)`: mean per-token entropy of router distributions over E experts, divided by log E
  (0: every token sure of one expert; 1: uniform routing).
- `load_entropy(counts)`: entropy of the expert load, divided by log E (1: perfectly balanced).
- `SpecialisationStats`: accumulates one module's tokens (top-1 expert, domain, token id, router probabilities)
  batch by batch and gives `mi_domain_top1_bits`, `mi_domain_top1_given_token_bits`, `router_entropy`,
  `load_entropy`, `max_load` and `tokens`, and `null_baseline()`, the two MIs under shuffled domain labels;
  `average_metrics` averages modules' results (all, or per layer).

Reading them: MI(domain; top-1) is at most log2 min(D, E) bits. It can be high because the router reads the
domain from context, or only because tokens differ between domains and the router routes by token;
MI(domain; top-1 | token) separates the two (0 when the expert is a function of the token). Plug-in MI is
biased upwards by about (D-1)(E-1)/(2 N ln 2) bits for N tokens, and the conditional one by that summed over
token ids, so it needs many tokens per token id: compare runs at equal N, and against `null_baseline()`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch

LOG2 = math.log(2.0)


def _labels(name: str, values, count: int | None) -> tuple[torch.Tensor, int]:
    """A flat int64 label tensor and its number of classes (given, or max + 1); refuses non-integers and
    labels outside [0, count)."""
    tensor = torch.as_tensor(values)
    not_integer = tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool
    if not_integer and tensor.numel():  # an empty list becomes a float32 tensor
        raise TypeError(f"{name} must hold integer labels, got dtype {tensor.dtype}")
    tensor = tensor.reshape(-1).to(torch.int64).cpu()
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        raise ValueError(f"the number of classes of {name} must be an integer >= 1, got {count!r}")
    if tensor.numel():
        low, high = int(tensor.min()), int(tensor.max())
        if low < 0 or (count is not None and high >= count):
            bound = f"[0, {count})" if count is not None else ">= 0"
            raise ValueError(f"{name} labels must be {bound}, got values in [{low}, {high}]")
        count = count if count is not None else high + 1
    return tensor, count or 1


def _same_length(**tensors: torch.Tensor) -> None:
    lengths = {name: t.numel() for name, t in tensors.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"the label arrays must have one length, got {lengths}")
    if not next(iter(lengths.values())):
        raise ValueError("no labels: mutual information needs at least one sample")


def _plogp_sum(counts: torch.Tensor, total: float) -> float:
    """sum over nonzero cells of (n / N) * log(n / N), in nats, from float64 counts."""
    probs = counts[counts > 0].double() / total
    return float((probs * probs.log()).sum())


def mutual_information_from_table(table: torch.Tensor) -> float:
    """I(A; B) in bits from a contingency table of counts [num_a, num_b]."""
    table = torch.as_tensor(table, dtype=torch.float64)
    if table.dim() != 2 or (table < 0).any() or not table.sum() > 0:
        raise ValueError(f"a contingency table must be a 2-D array of counts >= 0 with a positive sum, got shape "
                         f"{list(table.shape)}")
    total = float(table.sum())
    # I = H(A) + H(B) - H(A, B), each H = -sum p log p
    mi = _plogp_sum(table, total) - _plogp_sum(table.sum(1), total) - _plogp_sum(table.sum(0), total)
    return max(0.0, mi / LOG2)  # exact 0 for independent tables instead of a rounding -1e-17


def mutual_information(labels_a, labels_b, num_a: int | None = None, num_b: int | None = None) -> float:
    """I(A; B) in bits between two equally long arrays of integer labels (plug-in estimate). `num_a` / `num_b`
    give the number of classes (default: max label + 1); they change nothing but the checks."""
    a, num_a = _labels("labels_a", labels_a, num_a)
    b, num_b = _labels("labels_b", labels_b, num_b)
    _same_length(labels_a=a, labels_b=b)
    table = torch.bincount(a * num_b + b, minlength=num_a * num_b).reshape(num_a, num_b)
    return mutual_information_from_table(table)


def _conditional_mi_from_joint(keys: torch.Tensor, counts: torch.Tensor, num_a: int, num_b: int) -> float:
    """I(A; B | C) in bits from sparse counts of the joint (c, a, b), keyed c * num_a * num_b + a * num_b + b.
    I = sum p(a,b,c) log [p(a,b,c) p(c) / (p(a,c) p(b,c))] = H(A,C) + H(B,C) - H(A,B,C) - H(C)."""
    total = float(counts.sum())
    c, rest = keys // (num_a * num_b), keys % (num_a * num_b)
    a, b = rest // num_b, rest % num_b

    def marginal_plogp(marginal_keys: torch.Tensor) -> float:
        _, inverse = torch.unique(marginal_keys, return_inverse=True)
        summed = torch.zeros(int(inverse.max()) + 1, dtype=torch.float64).index_add_(0, inverse, counts.double())
        return _plogp_sum(summed, total)

    mi = (_plogp_sum(counts, total) + marginal_plogp(c) - marginal_plogp(c * num_a + a)
          - marginal_plogp(c * num_b + b))
    return max(0.0, mi / LOG2)


def conditional_mutual_information(labels_a, labels_b, condition, num_a: int | None = None,
                                   num_b: int | None = None) -> float:
    """I(A; B | C) in bits: the plug-in mutual information of A and B within each value of C, weighted by how
    often C takes it. C may have many classes (token ids): only the combinations that occur are stored."""
    a, num_a = _labels("labels_a", labels_a, num_a)
    b, num_b = _labels("labels_b", labels_b, num_b)
    c, _ = _labels("condition", condition, None)
    _same_length(labels_a=a, labels_b=b, condition=c)
    keys, counts = torch.unique(c * (num_a * num_b) + a * num_b + b, return_counts=True)
    return _conditional_mi_from_joint(keys, counts, num_a, num_b)


def _flat_mask(token_mask, num_tokens: int, name: str = "token_mask") -> torch.Tensor | None:
    """The indices of the tokens `token_mask` marks (None: all)."""
    if token_mask is None:
        return None
    mask = torch.as_tensor(token_mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True for real tokens), got dtype {mask.dtype}")
    mask = mask.reshape(-1).cpu()
    if mask.numel() != num_tokens:
        raise ValueError(f"{name} has {mask.numel()} elements for {num_tokens} tokens")
    return mask.nonzero().squeeze(1)  # indices: index_select is far faster than boolean indexing of 2-D rows


def _flat_probs(probs) -> torch.Tensor:
    """Router probabilities [..., E] as float64 rows [tokens, E]."""
    probs = torch.as_tensor(probs)
    if not probs.dtype.is_floating_point or probs.dim() < 1:
        raise TypeError(f"probs must be a float tensor [..., E] of router probabilities, got dtype {probs.dtype} "
                        f"shape {list(probs.shape)}")
    num_experts = probs.shape[-1]
    if num_experts < 2:
        raise ValueError(f"routing entropy is normalised by log E and needs E >= 2 experts, got E = {num_experts}")
    return probs.detach().reshape(-1, num_experts).double().cpu()


def _check_distributions(flat: torch.Tensor) -> None:
    """Checked on the counted tokens only: what padding positions hold is not the caller's concern."""
    sums = flat.sum(1)
    # A loose tolerance: bf16 router probabilities sum to 1 only to within ~1e-2.
    if not torch.isfinite(flat).all() or (flat < 0).any() or ((sums - 1).abs() > 2e-2).any():
        raise ValueError("probs must be probability distributions over the last dimension (finite, >= 0, each "
                         "summing to 1): pass softmax(router logits), not the logits")


def _token_entropies(flat_probs: torch.Tensor) -> torch.Tensor:
    """Per-row entropy in nats (0 log 0 = 0)."""
    return -torch.special.xlogy(flat_probs, flat_probs).sum(1)


def routing_entropy(probs, token_mask=None) -> float:
    """Mean over real tokens of the entropy of each token's router distribution, divided by log E.
    `probs` [..., E]; `token_mask` (bool, probs.shape[:-1]) marks the real tokens (default: all)."""
    flat = _flat_probs(probs)
    mask = _flat_mask(token_mask, flat.shape[0])
    if mask is not None:
        flat = flat.index_select(0, mask)
    if not flat.shape[0]:
        raise ValueError("no real tokens: the routing entropy of nothing is undefined")
    _check_distributions(flat)
    return float(_token_entropies(flat).mean()) / math.log(flat.shape[1])


def load_entropy(counts) -> float:
    """Entropy of the expert load (counts per expert, [E]) divided by log E: 1 for equal loads, 0 when one
    expert takes everything."""
    counts = torch.as_tensor(counts, dtype=torch.float64).reshape(-1).cpu()
    if counts.numel() < 2:
        raise ValueError(f"load entropy is normalised by log E and needs E >= 2 experts, got E = {counts.numel()}")
    if (counts < 0).any() or not torch.isfinite(counts).all() or not counts.sum() > 0:
        raise ValueError("counts must be finite, >= 0 and not all 0")
    return -_plogp_sum(counts, float(counts.sum())) / math.log(counts.numel())


class SpecialisationStats:
    """One module's specialisation metrics, accumulated over batches of tokens.

    `update(experts, domains, token_ids, probs, token_mask=None)`: per token its top-1 expert ([...], or the
    router's [..., k] experts, of which slot 0 is the top-1), its domain id, its token id and its router
    probabilities [..., E]; `token_mask` marks the tokens to count (real ones, e.g. held-out response tokens).
    `result()` -> {"mi_domain_top1_bits", "mi_domain_top1_given_token_bits", "router_entropy" (mean normalised
    per-token entropy), "load_entropy" and "max_load" (of the top-1 choices), "tokens"}."""

    def __init__(self, num_experts: int, num_domains: int):
        for name, value in (("num_experts", num_experts), ("num_domains", num_domains)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if num_experts < 2:
            raise ValueError(f"specialisation needs num_experts >= 2, got {num_experts}")
        self.num_experts, self.num_domains = num_experts, num_domains
        self.domain_expert = torch.zeros(num_domains, num_experts, dtype=torch.float64)
        self._keys = torch.zeros(0, dtype=torch.int64)  # (token, domain, expert) combined, unique
        self._key_counts = torch.zeros(0, dtype=torch.int64)
        self._entropy_sum = 0.0
        self.tokens = 0

    def update(self, experts, domains, token_ids, probs, token_mask=None) -> None:
        experts = torch.as_tensor(experts)
        probs_tensor = torch.as_tensor(probs)
        if probs_tensor.shape[-1:] != (self.num_experts,):
            raise ValueError(f"probs must have shape [..., E={self.num_experts}], got {list(probs_tensor.shape)}")
        token_shape = probs_tensor.shape[:-1]
        if experts.dim() == len(token_shape) + 1 and experts.shape[:-1] == token_shape:
            experts = experts[..., 0]  # the router's [..., k] choices: slot 0 is the most probable
        top1, _ = _labels("experts", experts, self.num_experts)
        domain, _ = _labels("domains", domains, self.num_domains)
        token, _ = _labels("token_ids", token_ids, None)
        flat_probs = _flat_probs(probs_tensor)
        lengths = {"experts": top1.numel(), "domains": domain.numel(), "token_ids": token.numel(),
                   "probs": flat_probs.shape[0]}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"update needs one entry per token in every argument, got {lengths}")
        mask = _flat_mask(token_mask, top1.numel())
        if mask is not None:
            top1, domain, token, flat_probs = (t.index_select(0, mask) for t in (top1, domain, token, flat_probs))
        if not top1.numel():
            return
        _check_distributions(flat_probs)
        cells = domain * self.num_experts + top1
        self.domain_expert += torch.bincount(cells, minlength=self.num_domains * self.num_experts).reshape(
            self.num_domains, self.num_experts).double()
        keys = token * (self.num_domains * self.num_experts) + cells
        merged, inverse = torch.unique(torch.cat([self._keys, keys]), return_inverse=True)
        counts = torch.zeros(merged.numel(), dtype=torch.int64)
        counts.index_add_(0, inverse, torch.cat([self._key_counts, torch.ones_like(keys)]))
        self._keys, self._key_counts = merged, counts
        self._entropy_sum += float(_token_entropies(flat_probs).sum())
        self.tokens += int(top1.numel())

    def result(self) -> dict[str, float]:
        if not self.tokens:
            raise ValueError("SpecialisationStats has counted no tokens (no update, or every token masked out)")
        load = self.domain_expert.sum(0)
        return {
            "mi_domain_top1_bits": mutual_information_from_table(self.domain_expert),
            "mi_domain_top1_given_token_bits": _conditional_mi_from_joint(self._keys, self._key_counts,
                                                                          self.num_domains, self.num_experts),
            "router_entropy": self._entropy_sum / self.tokens / math.log(self.num_experts),
            "load_entropy": load_entropy(load),
            "max_load": float(load.max() / load.sum()),
            "tokens": self.tokens,
        }

    def null_baseline(self, samples: int = 20, seed: int = 0) -> dict[str, float]:
        """What the two MI estimates give when the expert carries no information about the domain: their mean
        over `samples` shuffles of the domain labels, over all tokens for `mi_domain_top1_bits` and within each
        token id for `mi_domain_top1_given_token_bits` (keeping every token's domain and expert counts). The
        plug-in bias; an observed MI is evidence of specialisation only well above it."""
        if not self.tokens:
            raise ValueError("SpecialisationStats has counted no tokens (no update, or every token masked out)")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
        # Every counted token once, grouped by token id (the keys are sorted, token id first).
        keys = torch.repeat_interleave(self._keys, self._key_counts)
        token, cells = keys // (self.num_domains * self.num_experts), keys % (self.num_domains * self.num_experts)
        domain, expert = cells // self.num_experts, cells % self.num_experts
        generator = torch.Generator().manual_seed(seed)
        plain = given_token = 0.0
        for _ in range(samples):
            shuffled = domain.index_select(0, torch.randperm(domain.numel(), generator=generator))
            plain += mutual_information(shuffled, expert, self.num_domains, self.num_experts)
            # A random order, then a stable sort by token id: a permutation within each token's group.
            order = torch.randperm(domain.numel(), generator=generator)
            within = order.index_select(0, torch.argsort(token.index_select(0, order), stable=True))
            given_token += conditional_mutual_information(domain.index_select(0, within), expert, token,
                                                          self.num_domains, self.num_experts)
        return {"mi_domain_top1_bits": plain / samples, "mi_domain_top1_given_token_bits": given_token / samples}


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def layer_of(module_name: str) -> str:
    """"layer N" for a module under `...layers.N...` (Hugging Face decoder naming); else the name itself."""
    found = _LAYER.search(module_name)
    return f"layer {found.group(1)}" if found else module_name


def average_metrics(per_module: dict[str, dict[str, float]],
                    group_of: Callable[[str], str] | None = None) -> dict:
    """The unweighted mean of every metric over modules (`tokens` is summed instead). With `group_of` (e.g.
    `layer_of`, or a function giving the projection name), a dict group -> that mean over the group's modules,
    groups in order of first appearance."""
    if not per_module:
        raise ValueError("no modules to average")
    if group_of is not None:
        groups: dict[str, dict[str, dict[str, float]]] = {}
        for name, metrics in per_module.items():
            groups.setdefault(group_of(name), {})[name] = metrics
        return {group: average_metrics(members) for group, members in groups.items()}
    keys = list(next(iter(per_module.values())))
    for name, metrics in per_module.items():
        if set(metrics) != set(keys):
            raise ValueError(f"module {name} has metrics {sorted(metrics)}, others {sorted(keys)}")
    return {key: (sum(m[key] for m in per_module.values()) if key == "tokens"
                  else sum(m[key] for m in per_module.values()) / len(per_module)) for key in keys}
