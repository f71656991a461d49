"""Fused routing: softmax (fp32) + top-k (ties to the lower id) + renormalisation + counts + probability sums
in one pass over the logits; the backward recomputes the softmax from the logits instead of storing it.

A batch of S routings of the same tokens ([S, T, E] logits, e.g. the columns of one GEMM over sibling
projections' stacked routers, read in place through their strides) takes the same launches as one: the grid's
second axis is the routing. Up to SINGLE_PROGRAM_TILES tiles of tokens, one program per routing walks them all
and finishes the statistics itself: the forward is one launch (more tiles add the statistics kernel), and the
backward counts the masked tokens itself."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsedoctor_kernels._alloc import empty, empty_like
from sparsedoctor_kernels._validation import compute_dtype
from sparsedoctor_kernels.triton._dtypes import compute_type

# Tokens per program: a [BLOCK_T, BLOCK_E] tile of about this many elements stays in registers.
TILE_ELEMENTS = 4096
STATISTICS_ELEMENTS = 4096  # partial sums ([programs, experts]) per step of the statistics kernel
# Tiles one program walks in order rather than launching a program each plus the statistics kernel: a tile's
# serial latency (~1-2 us on a GPU, to be measured there) against one launch saved (cost.KERNEL_LAUNCH_S).
SINGLE_PROGRAM_TILES = 4


@triton.jit
def _softmax_rows(logits_ptr, stride_t, rows, cols, row_ok, col_ok, COMPUTE: tl.constexpr):
    """Softmax of a [BLOCK_T, BLOCK_E] tile and which rows are non-finite; padding columns come out 0,
    padding rows all 0.

    A row holding a NaN or +inf, or only -inf, has no finite softmax: like torch's, its probabilities are all
    NaN. It is detected explicitly (rather than left to propagate) because the GPU's max ignores NaN while the
    interpreter's propagates it, and the top-k must not depend on either."""
    mask = row_ok[:, None] & col_ok[None, :]
    z = tl.load(logits_ptr + rows[:, None] * stride_t + cols[None, :], mask=mask, other=float("-inf"))
    z = z.to(COMPUTE)
    nan_or_inf = mask & ((z != z) | (z == float("inf")))
    some_finite = mask & (z > float("-inf"))  # false for NaN too
    non_finite = row_ok & ((tl.max(nan_or_inf.to(tl.int32), axis=1) > 0)
                           | (tl.max(some_finite.to(tl.int32), axis=1) == 0))
    z = tl.where(non_finite[:, None] & mask, 0.0, z)  # any finite stand-in keeps the arithmetic below NaN-free
    z_max = tl.where(row_ok, tl.max(z, axis=1), 0.0)
    e = tl.where(mask, tl.exp(z - z_max[:, None]), 0.0)
    denom = tl.where(row_ok, tl.sum(e, axis=1), 1.0)
    probs = e / denom[:, None]
    return tl.where(non_finite[:, None] & mask, float("nan"), probs), non_finite


@triton.jit
def _counted_rows(token_mask_ptr, rows, row_ok, HAS_MASK: tl.constexpr):
    """The rows the statistics (counts, probability means) count: all real rows, or those `token_mask` marks."""
    if HAS_MASK:
        return row_ok & (tl.load(token_mask_ptr + rows, mask=row_ok, other=0) != 0)
    return row_ok


@triton.jit
def _num_counted(token_mask_ptr, num_tokens, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """Tokens the statistics count, at least 1 (as a float): every token, or the marked ones. Read by the one
    statistics program per 256 experts (T bytes each), which costs less than a separate launch."""
    if HAS_MASK:
        count = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, num_tokens, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            marked = tl.load(token_mask_ptr + offsets, mask=offsets < num_tokens, other=0) != 0
            count += marked.to(tl.int32)
        total = tl.sum(count, axis=0)
    else:
        total = num_tokens
    return tl.maximum(total, 1).to(tl.float32)


@triton.jit
def _route_statistics_kernel(
    partial_probs_ptr, partial_counts_ptr, num_programs, num_experts, token_mask_ptr, num_tokens, probs_mean_ptr,
    counts_ptr, HAS_MASK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, COMPUTE: tl.constexpr,
):
    """probs_mean = (sum of the forward programs' column sums, in program order) / tokens counted, and counts =
    the sum of their per-program counts: no zero-filled counter and no atomics (one launch fewer)."""
    problem = tl.program_id(1).to(tl.int64)  # the routing of a batch
    partial_probs_ptr += problem * num_programs * num_experts
    partial_counts_ptr += problem * num_programs * num_experts
    probs_mean_ptr += problem * num_experts
    counts_ptr += problem * num_experts
    cols = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    col_ok = cols < num_experts
    total = tl.zeros([BLOCK_E], dtype=COMPUTE)
    pairs = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_programs, BLOCK_P):
        programs = start + tl.arange(0, BLOCK_P)
        offsets = programs[:, None] * num_experts + cols[None, :]
        mask = (programs < num_programs)[:, None] & col_ok[None, :]
        total += tl.sum(tl.load(partial_probs_ptr + offsets, mask=mask, other=0.0), axis=0)
        pairs += tl.sum(tl.load(partial_counts_ptr + offsets, mask=mask, other=0), axis=0)
    count = _num_counted(token_mask_ptr, num_tokens, HAS_MASK, 1024).to(COMPUTE)
    tl.store(probs_mean_ptr + cols, total / count, mask=col_ok)
    tl.store(counts_ptr + cols, pairs, mask=col_ok)


@triton.jit
def _route_tile(logits_ptr, stride_t, weights_ptr, experts_ptr, token_mask_ptr, rows, num_tokens, num_experts,
                TOP_K: tl.constexpr, K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr,
                BLOCK_E: tl.constexpr, COMPUTE: tl.constexpr):
    """Routes the tile's rows; returns its statistics: (probability column sums over the counted rows
    [BLOCK_E], (counted token, slot) pairs per expert [BLOCK_E], counted rows)."""
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, K_PAD)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    probs, non_finite = _softmax_rows(logits_ptr, stride_t, rows, cols, row_ok, col_ok, COMPUTE)
    counted = _counted_rows(token_mask_ptr, rows, row_ok, HAS_MASK)
    probs_sum = tl.sum(tl.where(counted[:, None], probs, 0.0), axis=0)

    # Top-k by k rounds of argmax; padding columns sit at -1, below any probability, chosen ones at -2.
    # Non-finite rows compete with equal scores, so they pick experts 0..k-1 as torch's stable sort of NaNs does.
    candidates = tl.where(row_ok[:, None] & col_ok[None, :], tl.where(non_finite[:, None], 0.0, probs), -1.0)
    top = tl.zeros([rows.shape[0], K_PAD], dtype=COMPUTE)
    chosen_ids = tl.zeros([rows.shape[0], K_PAD], dtype=tl.int32)
    pairs = tl.zeros([BLOCK_E], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(candidates, axis=1)
        # Lowest column holding the maximum: ties go to the lower expert id.
        chosen = tl.min(tl.where(candidates == best[:, None], cols[None, :], BLOCK_E), axis=1)
        chosen = tl.minimum(chosen, num_experts - 1)  # never index past the experts, whatever the scores
        top = tl.where(slots[None, :] == j, best[:, None], top)
        chosen_ids = tl.where(slots[None, :] == j, chosen[:, None], chosen_ids)
        pairs += tl.sum(((cols[None, :] == chosen[:, None]) & counted[:, None]).to(tl.int32), axis=0)
        candidates = tl.where(cols[None, :] == chosen[:, None], -2.0, candidates)
    top = tl.where(non_finite[:, None], float("nan"), top)
    if RENORMALIZE:
        top = top / tl.sum(top, axis=1)[:, None]
    out_mask = row_ok[:, None] & (slots[None, :] < TOP_K)
    offsets = rows[:, None] * TOP_K + slots[None, :]
    tl.store(weights_ptr + offsets, top, mask=out_mask)
    tl.store(experts_ptr + offsets, chosen_ids, mask=out_mask)
    return probs_sum, pairs, tl.sum(counted.to(tl.int32), axis=0)


@triton.jit
def _route_forward_kernel(
    logits_ptr, stride_s, stride_t,
    weights_ptr, experts_ptr, partial_counts_ptr, partial_probs_ptr, token_mask_ptr, probs_mean_ptr, counts_ptr,
    num_tokens, num_experts, tiles_per_program,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, COMPUTE: tl.constexpr, STATISTICS: tl.constexpr = True,
    SINGLE: tl.constexpr = False,
):
    """Each program routes `tiles_per_program` tiles of BLOCK_T tokens in order. SINGLE (one program per
    routing) also finishes the statistics (probs_mean, counts); otherwise each program leaves its partial sums
    for `_route_statistics_kernel`."""
    pid = tl.program_id(0)
    problem = tl.program_id(1).to(tl.int64)  # the routing of a batch
    logits_ptr += problem * stride_s
    weights_ptr += problem * num_tokens * TOP_K
    experts_ptr += problem * num_tokens * TOP_K
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < num_experts
    probs_sum = tl.zeros([BLOCK_E], dtype=COMPUTE)
    pairs = tl.zeros([BLOCK_E], dtype=tl.int32)
    counted = 0
    first = pid * tiles_per_program
    for tile in range(first, first + tiles_per_program):
        rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        tile_probs, tile_pairs, tile_counted = _route_tile(
            logits_ptr, stride_t, weights_ptr, experts_ptr, token_mask_ptr, rows, num_tokens, num_experts,
            TOP_K, K_PAD, RENORMALIZE, HAS_MASK, BLOCK_E, COMPUTE)
        probs_sum += tile_probs
        pairs += tile_pairs
        counted += tile_counted
    if STATISTICS:
        if SINGLE:
            tl.store(probs_mean_ptr + problem * num_experts + cols,
                     probs_sum / tl.maximum(counted, 1).to(COMPUTE), mask=col_ok)
            tl.store(counts_ptr + problem * num_experts + cols, pairs, mask=col_ok)
        else:
            # Per-program sums, reduced by the statistics kernel in a fixed order (deterministic, no atomics).
            partial = (problem * tl.num_programs(0) + pid) * num_experts + cols
            tl.store(partial_probs_ptr + partial, probs_sum, mask=col_ok)
            tl.store(partial_counts_ptr + partial, pairs, mask=col_ok)


@triton.jit
def _route_backward_kernel(
    grad_weights_ptr, grad_probs_mean_ptr, logits_ptr, stride_s, stride_t, experts_ptr, grad_logits_ptr,
    stride_grad_s, stride_grad_t, token_mask_ptr, num_counted_ptr, num_tokens, num_experts, tiles_per_program,
    extra_ptr, stride_extra_s, stride_extra_t,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr, COMPUTE: tl.constexpr, SINGLE: tl.constexpr = False, EXTRA: tl.constexpr = False,
):
    """Each program takes `tiles_per_program` tiles of BLOCK_T tokens. SINGLE (one program per routing) counts
    the masked tokens itself; otherwise the launcher counted them once into num_counted. EXTRA: a gradient the
    logits received from elsewhere, added to the routing's."""
    pid = tl.program_id(0)
    problem = tl.program_id(1).to(tl.int64)  # the routing of a batch
    grad_weights_ptr += problem * num_tokens * TOP_K
    grad_probs_mean_ptr += problem * num_experts
    logits_ptr += problem * stride_s
    experts_ptr += problem * num_tokens * TOP_K
    grad_logits_ptr += problem * stride_grad_s
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < num_experts
    # d probs_mean / d probs[t, e] = 1 / (tokens counted) for every counted token.
    grad_mean = tl.load(grad_probs_mean_ptr + cols, mask=col_ok, other=0.0).to(COMPUTE)
    if SINGLE:
        grad_mean = grad_mean / _num_counted(token_mask_ptr, num_tokens, HAS_MASK, 1024).to(COMPUTE)
    else:
        num_counted = tl.maximum(tl.load(num_counted_ptr), 1) if HAS_MASK else tl.maximum(num_tokens, 1)
        grad_mean = grad_mean / num_counted.to(COMPUTE)
    first = pid * tiles_per_program
    for tile in range(first, first + tiles_per_program):
        rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < num_tokens
        probs, _ = _softmax_rows(logits_ptr, stride_t, rows, cols, row_ok, col_ok, COMPUTE)
        counted = _counted_rows(token_mask_ptr, rows, row_ok, HAS_MASK)
        grad_probs = tl.where(counted[:, None], grad_mean[None, :], 0.0)

        total = tl.zeros([BLOCK_T], dtype=COMPUTE)
        weighted = tl.zeros([BLOCK_T], dtype=COMPUTE)
        if RENORMALIZE:  # weights = top / sum(top): d/d top_j = (g_j - sum_i g_i w_i) / sum(top)
            for j in tl.static_range(TOP_K):
                expert = tl.load(experts_ptr + rows * TOP_K + j, mask=row_ok, other=0)
                grad_w = tl.load(grad_weights_ptr + rows * TOP_K + j, mask=row_ok, other=0.0).to(COMPUTE)
                top = tl.sum(tl.where(cols[None, :] == expert[:, None], probs, 0.0), axis=1)
                total += top
                weighted += grad_w * top
            total = tl.where(row_ok, total, 1.0)
        for j in tl.static_range(TOP_K):
            expert = tl.load(experts_ptr + rows * TOP_K + j, mask=row_ok, other=0)
            grad_top = tl.load(grad_weights_ptr + rows * TOP_K + j, mask=row_ok, other=0.0).to(COMPUTE)
            if RENORMALIZE:
                grad_top = (grad_top - weighted / total) / total
            grad_probs += tl.where(cols[None, :] == expert[:, None], grad_top[:, None], 0.0)

        # Softmax backward: dz = p * (dp - <p, dp>).
        grad_logits = probs * (grad_probs - tl.sum(grad_probs * probs, axis=1)[:, None])
        mask = row_ok[:, None] & col_ok[None, :]
        if EXTRA:
            extra_rows = extra_ptr + problem * stride_extra_s + rows[:, None] * stride_extra_t
            grad_logits += tl.load(extra_rows + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        tl.store(grad_logits_ptr + rows[:, None] * stride_grad_t + cols[None, :],
                 grad_logits.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _blocks(num_experts: int) -> tuple[int, int]:
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(128, TILE_ELEMENTS // block_e))
    return block_t, block_e


def num_warps(block_e: int) -> int:
    """Wide rows (E >= 128) get 8 warps: with 4 the backward spills on sm_90 (compile_check)."""
    return 8 if block_e >= 128 else 4


def _batch(logits: torch.Tensor) -> tuple[int, int]:
    """(routings, stride between them): a single [T, E] routing is a batch of one."""
    return (logits.shape[0], logits.stride(0)) if logits.dim() == 3 else (1, 0)


def _grid(num_tokens: int, block_t: int) -> tuple[int, int]:
    """(programs per routing, tiles each): one program walks every tile when there are at most
    SINGLE_PROGRAM_TILES, so a training batch's routing and its statistics are one launch; more tiles get one
    program each."""
    tiles = triton.cdiv(num_tokens, block_t)
    return (1, tiles) if tiles <= SINGLE_PROGRAM_TILES else (tiles, 1)


def _route_rows(logits: torch.Tensor, top_k: int, renormalize: bool, token_mask, statistics: bool):
    """(weights, experts, counts, probs_mean, partial): the forward kernel's outputs. With `statistics`, one
    program per routing finishes counts and probs_mean itself (partial is None); several leave their sums in
    partial (counts, probs) [routings, programs, E] for `_route_statistics_kernel`. Without, all but weights
    and experts are None."""
    num_tokens, num_experts = logits.shape[-2:]
    batch = tuple(logits.shape[:-2])
    num_problems, stride_s = _batch(logits)
    dtype = compute_dtype(logits.dtype)
    block_t, block_e = _blocks(num_experts)
    num_programs, tiles_per_program = _grid(num_tokens, block_t)
    single = num_programs == 1
    weights = empty((*batch, num_tokens, top_k), dtype, logits.device)
    experts = empty((*batch, num_tokens, top_k), torch.int32, logits.device)
    counts = probs_mean = partial = None
    if statistics:
        counts = empty((*batch, num_experts), torch.int32, logits.device)
        probs_mean = empty((*batch, num_experts), dtype, logits.device)
        if not single:
            partial = (empty((num_problems, num_programs, num_experts), torch.int32, logits.device),
                       empty((num_problems, num_programs, num_experts), dtype, logits.device))
    partial_counts, partial_probs = partial if partial is not None else (experts, weights)  # unused stand-ins
    if num_problems > 0:
        _route_forward_kernel[(num_programs, num_problems)](
            logits, stride_s, logits.stride(-2), weights, experts, partial_counts, partial_probs,
            token_mask if token_mask is not None else experts, probs_mean if statistics else weights,
            counts if statistics else experts, num_tokens, num_experts, tiles_per_program,
            TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), RENORMALIZE=renormalize,
            HAS_MASK=token_mask is not None, BLOCK_T=block_t, BLOCK_E=block_e, COMPUTE=compute_type(dtype),
            num_warps=num_warps(block_e), STATISTICS=statistics, SINGLE=single,
        )
    return weights, experts, counts, probs_mean, partial


def forward(logits: torch.Tensor, top_k: int, renormalize: bool, token_mask: torch.Tensor | None = None):
    """Logits [T, E] or [S, T, E], read through their strides (experts contiguous); outputs batched alike."""
    num_tokens, num_experts = logits.shape[-2:]
    num_problems = _batch(logits)[0]
    weights, experts, counts, probs_mean, partial = _route_rows(logits, top_k, renormalize, token_mask, True)
    if partial is None or num_problems == 0:  # finished by the one program per routing, or nothing to route
        return weights, experts, counts, probs_mean
    block_e = min(_blocks(num_experts)[1], 256)
    _route_statistics_kernel[(triton.cdiv(num_experts, block_e), num_problems)](
        partial[1], partial[0], partial[0].shape[1], num_experts, token_mask if token_mask is not None else counts,
        num_tokens, probs_mean, counts, HAS_MASK=token_mask is not None, BLOCK_P=max(1, STATISTICS_ELEMENTS // block_e),
        BLOCK_E=block_e, COMPUTE=compute_type(compute_dtype(logits.dtype)),
    )
    return weights, experts, counts, probs_mean


def forward_without_statistics(logits: torch.Tensor, top_k: int, renormalize: bool):
    """(weights, experts) of `forward` from its first kernel alone: no counts or probability means (inference,
    where no balance term is wanted), one launch."""
    return _route_rows(logits, top_k, renormalize, None, False)[:2]


def backward(grad_weights, grad_probs_mean, logits, experts, renormalize: bool,
             token_mask: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> torch.Tensor:
    """d loss / d logits, laid out as the logits are when they are dense (a transposed GEMM output stays so);
    `extra` (logits' shape, experts contiguous): a gradient the logits got from elsewhere, added in."""
    num_tokens, num_experts = logits.shape[-2:]
    num_problems, stride_s = _batch(logits)
    top_k = experts.shape[-1]
    block_t, block_e = _blocks(num_experts)
    grad_logits = empty_like(logits)  # the logits' strides when dense, else contiguous
    num_programs, tiles_per_program = _grid(num_tokens, block_t)
    single = num_programs == 1
    if num_tokens > 0 and num_problems > 0:
        num_counted = token_mask.sum(dtype=torch.int32) if token_mask is not None and not single else experts
        _route_backward_kernel[(num_programs, num_problems)](
            grad_weights, grad_probs_mean, logits, stride_s, logits.stride(-2), experts, grad_logits,
            _batch(grad_logits)[1], grad_logits.stride(-2), token_mask if token_mask is not None else experts,
            num_counted, num_tokens, num_experts, tiles_per_program,
            *((extra, _batch(extra)[1], extra.stride(-2)) if extra is not None else (logits, 0, 0)),
            TOP_K=top_k, RENORMALIZE=renormalize, HAS_MASK=token_mask is not None, BLOCK_T=block_t, BLOCK_E=block_e,
            COMPUTE=compute_type(compute_dtype(logits.dtype)), num_warps=num_warps(block_e), SINGLE=single,
            EXTRA=extra is not None,
        )
    return grad_logits
