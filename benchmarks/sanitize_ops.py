"""Every op on every backend at small, odd and hostile shapes: the script `compute-sanitizer` runs on the GPU.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_ops.py            # out-of-bounds accesses
    compute-sanitizer --tool racecheck python benchmarks/sanitize_ops.py --ops queue  # the enqueue scan

Each case runs forward and backward and compares both, the outputs and the gradients, with the torch reference
run the same way on the same inputs in float64 on the CPU (a wrong value exits 1 too), so a clean sanitizer
report and exit 0 together say the kernels neither touch memory they should not nor compute the wrong thing.
Cases: expert ids out of range (negative, E, huge int64), experts without tokens, non-finite router rows,
empty inputs, odd sizes, `out=` (contiguous, transposed), both lora_moe strategies, `lora_moe(regate=...)`
(repeated rows, rows and ids out of range, no rows, no tokens), queues partly filled, wrapping, and over
capacity in one call, `group_infonce` (no rows, empty groups, rows of no group, tiles at the Triton kernel's
limit). On CPU it runs the Triton kernels under TRITON_INTERPRET=1 (the tests do that), with no sanitizer.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

OPS = ("route", "lora_moe", "lora_moe_regate", "queue", "infonce", "group_infonce")
CPU = torch.device("cpu")


def _backends(op: str, device: torch.device) -> list[str]:
    from sparsedoctor_kernels._backend import why_backend_cannot_run
    from sparsedoctor_kernels.ops import IMPLEMENTATIONS

    name = {"queue": "ExpertQueue.enqueue", "infonce": "infonce_queue_loss", "lora_moe_regate": "lora_moe"}.get(op, op)
    return [b for b in IMPLEMENTATIONS[name] if why_backend_cannot_run(b, device) is None]


def _close(got: torch.Tensor, want: torch.Tensor, what: str, failures: list[str], tol: float = 1e-4) -> None:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape or not torch.allclose(got, want, atol=tol, rtol=tol, equal_nan=True):
        failures.append(what)


def _compare(got: dict, want: dict, label: str, failures: list[str], exact: tuple[str, ...] = ()) -> None:
    """Every result of a run (outputs, then "grad <input>") against the reference run's."""
    for name, value in want.items():
        _close(got[name], value, f"{label}: {name}", failures, 0 if name in exact else 1e-4)


def _leaves(tensors: dict, dtype: torch.dtype, device: torch.device) -> dict:
    """Fresh leaves (copies: the cases' tensors never become leaves that collect gradients themselves)."""
    return {name: t.to(device, dtype, copy=True).requires_grad_() for name, t in tensors.items()}


def _grads(leaves: dict) -> dict:
    """Each leaf's gradient ("grad <name>"); none at all reads as zeros, which the empty cases expect."""
    return {f"grad {name}": torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for name, leaf in leaves.items()}


def _route_run(logits, mask, cotangents, top_k, backend, dtype, device):
    import sparsedoctor_kernels as sdk

    leaves = _leaves({"logits": logits}, dtype, device)
    got = sdk.route(leaves["logits"], top_k, backend=backend, token_mask=mask.to(device))
    # nansum: the non-finite rows' NaN weights (and the NaN probs_mean they give) send back zero gradient.
    loss = sum((getattr(got, name) * cot.to(device, got.weights.dtype)).nansum() for name, cot in cotangents.items())
    loss.backward()
    return {"experts": got.experts, "counts": got.counts, "weights": got.weights, "probs_mean": got.probs_mean,
            **_grads(leaves)}


def route_cases(device, failures):
    inf, nan = float("inf"), float("nan")
    gen = torch.Generator().manual_seed(4)
    for num_tokens, num_experts, top_k in ((0, 5, 2), (1, 1, 1), (37, 6, 2), (130, 40, 5), (3, 256, 8)):
        logits = torch.randn(num_tokens, num_experts, generator=gen, dtype=torch.float64)
        if num_tokens >= 4:
            logits[0] = -inf
            logits[1, 0] = nan
            logits[2, -1] = inf
        mask = torch.arange(num_tokens) % 3 != 0
        cotangents = {"weights": torch.randn(num_tokens, top_k, generator=gen, dtype=torch.float64),
                      "probs_mean": torch.randn(num_experts, generator=gen, dtype=torch.float64)}
        want = _route_run(logits, mask, cotangents, top_k, "torch", torch.float64, CPU)
        for backend in _backends("route", device):
            got = _route_run(logits, mask, cotangents, top_k, backend, torch.float32, device)
            _compare(got, want, f"route {backend} T={num_tokens} E={num_experts} k={top_k}", failures,
                     exact=("experts", "counts"))


def _lora_moe_run(tensors, experts, cotangents, layout, backend, strategy, dtype, device, regate=None):
    """One call, `(y * cot_y).sum()` (+ the regated rows') backward; `out=` is a product of a leaf, so its
    gradient is checked too: with layout "transposed" the leaf is [d_out, T] and out its transposed view."""
    import sparsedoctor_kernels as sdk

    names = ("x", "lora_a", "lora_b", "weights") + (("rows_weights",) if regate is not None else ())
    leaves = _leaves({name: tensors[name] for name in names}, dtype, device)
    out = None
    if layout == "contiguous":
        leaves["out"] = tensors["out"].to(device, dtype, copy=True).requires_grad_()
        out = leaves["out"] * 1
    elif layout == "transposed":
        leaves["out"] = tensors["out"].T.contiguous().to(device, dtype, copy=True).requires_grad_()
        out = (leaves["out"] * 1).T
    kwargs = dict(scaling=1.5, out=out, backend=backend, validate=False, strategy=strategy)
    args = (leaves["x"], leaves["lora_a"], leaves["lora_b"], leaves["weights"], experts.to(device))
    if regate is None:
        results = {"y": sdk.lora_moe(*args, **kwargs)}
    else:
        rows, rows_experts = regate
        y, y2 = sdk.lora_moe(*args, regate=(rows.to(device), leaves["rows_weights"], rows_experts.to(device)),
                             **kwargs)
        results = {"y": y, "y2": y2}
    sum((value * cotangents[name].to(device, dtype)).sum() for name, value in results.items()).backward()
    returned_out = {} if out is None else {"y is out": torch.tensor(float(results["y"] is out))}
    return {**{name: value.detach() for name, value in results.items()}, **returned_out, **_grads(leaves)}


def _lora_moe_inputs(gen, num_tokens, d_in, d_out, num_experts, rank, top_k):
    f64 = dict(generator=gen, dtype=torch.float64)
    tensors = {"x": torch.randn(num_tokens, d_in, **f64),
               "lora_a": torch.randn(num_experts, rank, d_in, **f64) / d_in**0.5,
               "lora_b": torch.randn(num_experts, d_out, rank, **f64),
               "weights": torch.rand(num_tokens, top_k, **f64),
               "out": torch.randn(num_tokens, d_out, **f64)}
    experts = torch.randint(0, max(1, num_experts - 1), (num_tokens, top_k), generator=gen)  # last one unused
    if num_tokens >= 3:
        experts[0, 0], experts[1, -1], experts[2, 0] = -1, num_experts, 2**40  # dropped without validation
    return tensors, experts


def lora_moe_cases(device, failures):
    gen = torch.Generator().manual_seed(0)
    for num_tokens, d_in, d_out, num_experts, rank, top_k in ((0, 8, 6, 3, 2, 2), (1, 1, 1, 1, 1, 1),
                                                              (29, 24, 19, 5, 3, 2), (70, 33, 67, 64, 8, 4),
                                                              (9, 13, 11, 2, 67, 1)):
        tensors, experts = _lora_moe_inputs(gen, num_tokens, d_in, d_out, num_experts, rank, top_k)
        cotangents = {"y": torch.randn(num_tokens, d_out, generator=gen, dtype=torch.float64)}
        _compare_lora_moe_runs("lora_moe", tensors, experts, cotangents, None, device, failures,
                               f"T={num_tokens} E={num_experts} r={rank} k={top_k}")


def _compare_lora_moe_runs(op, tensors, experts, cotangents, regate, device, failures, sizes):
    """Every backend and strategy, with each `out=` layout, against the float64 reference run the same way."""
    for layout in ("none", "contiguous", "transposed"):
        want = _lora_moe_run(tensors, experts, cotangents, layout, "torch", "grouped", torch.float64, CPU, regate)
        for backend in _backends(op, device):
            for strategy in ("grouped", "dense"):
                got = _lora_moe_run(tensors, experts, cotangents, layout, backend, strategy, torch.float32,
                                    device, regate)
                _compare(got, want, f"{op} {backend}/{strategy} out={layout} {sizes}", failures)


def lora_moe_regate_cases(device, failures):
    gen = torch.Generator().manual_seed(5)
    for num_tokens, d_in, d_out, num_experts, rank, top_k, num_rows, rows_top_k, id_dtype in (
        (0, 8, 6, 3, 2, 2, 3, 2, torch.int64),  # no tokens: every row is outside [0, T)
        (0, 5, 4, 2, 3, 1, 0, 1, torch.int64),  # no tokens and no rows
        (6, 7, 9, 3, 2, 2, 0, 3, torch.int32),  # no rows
        (29, 24, 19, 5, 3, 2, 12, 3, torch.int64),
        (40, 33, 67, 17, 8, 4, 17, 1, torch.int32),  # E * r = 136: more than one dense shrink program holds
        (9, 13, 11, 2, 67, 1, 7, 2, torch.int64),
    ):
        tensors, experts = _lora_moe_inputs(gen, num_tokens, d_in, d_out, num_experts, rank, top_k)
        tensors["rows_weights"] = torch.rand(num_rows, rows_top_k, generator=gen, dtype=torch.float64)
        rows = torch.randint(0, max(1, num_tokens), (num_rows,), generator=gen)
        rows_experts = torch.randint(0, num_experts, (num_rows, rows_top_k), generator=gen)
        big = 2**40 if id_dtype == torch.int64 else 2**31 - 1
        if num_rows >= 6:
            rows[1] = rows[2] = rows[0]  # one row three times: its gradients add up
            rows[3], rows[4], rows[5] = -1, num_tokens, big  # zero rows of y2, no gradient (validate=False)
            rows_experts[0, 0], rows_experts[1, -1], rows_experts[2, 0] = -1, num_experts, big  # add nothing
        regate = (rows.to(id_dtype), rows_experts.to(id_dtype))
        cotangents = {"y": torch.randn(num_tokens, d_out, generator=gen, dtype=torch.float64),
                      "y2": torch.randn(num_rows, d_out, generator=gen, dtype=torch.float64)}
        _compare_lora_moe_runs("lora_moe_regate", tensors, experts, cotangents, regate, device, failures,
                               f"T={num_tokens} E={num_experts} r={rank} k={top_k} m={num_rows} k2={rows_top_k}")


def queue_cases(device, failures):
    import sparsedoctor_kernels as sdk

    gen = torch.Generator().manual_seed(1)
    for num_experts, capacity, rows in ((3, 7, 0), (3, 7, 5), (4, 5, 40), (64, 3, 700), (1, 1000, 1500)):
        keys = torch.randn(rows, 6, generator=gen)
        ids = torch.randint(-2, num_experts + 2, (rows,), generator=gen)
        if rows:
            ids[0] = 2**33 + 1
        for backend in _backends("queue", device):
            reference = sdk.ExpertQueue(num_experts, capacity, 6)
            queue = sdk.ExpertQueue(num_experts, capacity, 6, device=device)
            for _ in range(2):  # the second call wraps
                reference.enqueue(keys, ids, backend="torch", validate=False)
                queue.enqueue(keys.to(device), ids.to(device), backend=backend, validate=False)
            for name in ("keys", "ptr", "size"):
                _close(getattr(queue, name), getattr(reference, name), f"queue {backend} E={num_experts} "
                       f"Q={capacity} N={rows}: {name}", failures, 0)


def _infonce_run(query, positive, keys, size, owner, cotangent, backend, dtype, device):
    import sparsedoctor_kernels as sdk

    leaves = _leaves({"query": query, "positive": positive}, dtype, device)
    loss = sdk.infonce_queue_loss(leaves["query"], leaves["positive"], (keys.to(device, dtype), size.to(device)),
                                  owner.to(device), reduction="none", backend=backend, validate=False)
    (loss * cotangent.to(device, loss.dtype)).sum().backward()
    return {"loss": loss.detach(), **_grads(leaves)}


def infonce_cases(device, failures):
    gen = torch.Generator().manual_seed(2)
    for rows, num_experts, capacity, dim in ((0, 3, 4, 8), (5, 1, 3, 7), (31, 4, 9, 16), (70, 64, 5, 33)):
        query, positive = torch.randn(rows, dim, generator=gen), torch.randn(rows, dim, generator=gen)
        keys = torch.nn.functional.normalize(torch.randn(num_experts, capacity, dim, generator=gen), dim=-1)
        size = torch.randint(0, capacity + 1, (num_experts,), generator=gen)
        owner = torch.randint(-1, num_experts, (rows,), generator=gen)
        cotangent = torch.randn(rows, generator=gen)
        inputs = (query, positive, keys, size, owner, cotangent)
        want = _infonce_run(*inputs, "torch", torch.float64, CPU)
        for backend in _backends("infonce", device):
            got = _infonce_run(*inputs, backend, torch.float32, device)
            _compare(got, want, f"infonce {backend} N={rows} E={num_experts} Q={capacity} p={dim}", failures)


def _group_infonce_run(x, groups, num_groups, temperature, cotangent, backend, dtype, device):
    import sparsedoctor_kernels as sdk

    leaves = _leaves({"x": x}, dtype, device)
    loss = sdk.group_infonce(leaves["x"], groups.to(device), num_groups, temperature=temperature, backend=backend)
    (loss * cotangent).backward()
    return {"loss": loss.detach(), **_grads(leaves)}


def group_infonce_cases(device, failures):
    gen = torch.Generator().manual_seed(3)
    # The Triton kernel pads n, d and S each to a power of two >= 16 and holds n x max(d, S) and S x d of them
    # in one program, each at most MAX_TILE = 4096 elements: the last two shapes fill that exactly.
    for rows, dim, num_groups, temperature, id_dtype, fixed in (
        (0, 5, 3, 0.07, torch.int64, None),  # no rows: loss 0
        (1, 1, 1, 0.07, torch.int32, None),  # one row, no partner: loss 0
        (6, 4, 1, 0.5, torch.int64, None),  # one group: no negatives
        (4, 3, 2, 0.07, torch.int32, [-1, 2, -1, 2**31 - 1]),  # no row in any group
        (23, 7, 5, 0.07, torch.int32, None),
        (45, 17, 9, 0.2, torch.int64, None),
        (250, 9, 13, 0.07, torch.int64, None),  # [256, 16] tiles
        (13, 200, 3, 0.1, torch.int32, None),  # [16, 256] tiles
    ):
        x = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
        if fixed is not None:
            groups = torch.tensor(fixed)
        else:
            groups = torch.randint(0, num_groups, (rows,), generator=gen)
            if num_groups >= 3:
                groups[groups == 1] = 0  # group 1 has no rows
            if rows >= 8:
                big = 2**40 if id_dtype == torch.int64 else 2**31 - 1
                groups[:4] = torch.tensor([-1, num_groups, big, -big])  # rows of no group take no part ...
                x[0] = float("nan")  # ... not even their values (selected out; no validate to turn off)
        cotangent = 0.5 + torch.rand((), generator=gen).item()
        inputs = (x, groups.to(id_dtype), num_groups, temperature, cotangent)
        want = _group_infonce_run(*inputs, "torch", torch.float64, CPU)
        for backend in _backends("group_infonce", device):
            got = _group_infonce_run(*inputs, backend, torch.float32, device)
            _compare(got, want, f"group_infonce {backend} n={rows} d={dim} S={num_groups} T={temperature} "
                     f"ids={str(id_dtype).removeprefix('torch.')}", failures)


CASES = {"route": route_cases, "lora_moe": lora_moe_cases, "lora_moe_regate": lora_moe_regate_cases,
         "queue": queue_cases, "infonce": infonce_cases, "group_infonce": group_infonce_cases}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import sparsedoctor_kernels._alloc

    # Outputs start as NaN or a sentinel, as in the tests: an element a kernel fails to write is a wrong result
    # here, not whatever the fresh allocation happened to hold.
    sparsedoctor_kernels._alloc.poison_outputs = True
    failures: list[str] = []
    for op in args.ops:
        CASES[op](device, failures)
        if device.type == "cuda":
            torch.cuda.synchronize()  # a kernel fault surfaces here, attributed to its op
        print(f"{op}: done", flush=True)
    for failure in failures:
        print(f"WRONG: {failure}")
    print(f"{len(failures)} wrong results" if failures else "every case matched the reference")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
