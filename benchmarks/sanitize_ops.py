"""Every op on every backend at small, odd and hostile shapes: the script `compute-sanitizer` runs on the GPU.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_ops.py            # out-of-bounds accesses
    compute-sanitizer --tool racecheck python benchmarks/sanitize_ops.py --ops queue  # the enqueue scan

Each case runs forward and backward and compares with the torch reference (a wrong value exits 1 too), so a
clean sanitizer report and exit 0 together say the kernels neither touch memory they should not nor compute
the wrong thing. Cases: expert ids out of range (negative, E, huge int64), experts without tokens, non-finite
router rows, empty inputs, odd sizes, `out=` (contiguous, transposed), both lora_moe strategies, queues
partly filled, wrapping, and over capacity in one call. On CPU it runs the Triton kernels under
TRITON_INTERPRET=1 (the tests do that), with no sanitizer.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

OPS = ("route", "lora_moe", "queue", "infonce")


def _backends(op: str, device: torch.device) -> list[str]:
    from sparsedoctor_kernels._backend import why_backend_cannot_run
    from sparsedoctor_kernels.ops import IMPLEMENTATIONS

    name = {"queue": "ExpertQueue.enqueue", "infonce": "infonce_queue_loss"}.get(op, op)
    return [b for b in IMPLEMENTATIONS[name] if why_backend_cannot_run(b, device) is None]


def _close(got: torch.Tensor, want: torch.Tensor, what: str, failures: list[str], tol: float = 1e-4) -> None:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape or not torch.allclose(got, want, atol=tol, rtol=tol, equal_nan=True):
        failures.append(what)


def route_cases(device, failures):
    import sparsedoctor_kernels as sdk

    inf, nan = float("inf"), float("nan")
    for num_tokens, num_experts, top_k in ((0, 5, 2), (1, 1, 1), (37, 6, 2), (130, 40, 5), (3, 256, 8)):
        logits = torch.randn(num_tokens, num_experts, dtype=torch.float64)
        if num_tokens >= 4:
            logits[0] = -inf
            logits[1, 0] = nan
            logits[2, -1] = inf
        mask = torch.arange(num_tokens) % 3 != 0
        want = sdk.route(logits, top_k, backend="torch", token_mask=mask)
        for backend in _backends("route", device):
            leaf = logits.float().to(device).requires_grad_()
            got = sdk.route(leaf, top_k, backend=backend, token_mask=mask.to(device))
            got.weights.nansum().backward()
            label = f"route {backend} T={num_tokens} E={num_experts} k={top_k}"
            _close(got.experts, want.experts, f"{label}: experts", failures, 0)
            _close(got.counts, want.counts, f"{label}: counts", failures, 0)
            _close(got.weights, want.weights, f"{label}: weights", failures)


def lora_moe_cases(device, failures):
    import sparsedoctor_kernels as sdk

    gen = torch.Generator().manual_seed(0)
    for num_tokens, d_in, d_out, num_experts, rank, top_k in ((0, 8, 6, 3, 2, 2), (1, 1, 1, 1, 1, 1),
                                                              (29, 24, 19, 5, 3, 2), (70, 33, 67, 64, 8, 4),
                                                              (9, 13, 11, 2, 67, 1)):
        x = torch.randn(num_tokens, d_in, generator=gen, dtype=torch.float64)
        lora_a = torch.randn(num_experts, rank, d_in, generator=gen, dtype=torch.float64) / d_in**0.5
        lora_b = torch.randn(num_experts, d_out, rank, generator=gen, dtype=torch.float64)
        weights = torch.rand(num_tokens, top_k, generator=gen, dtype=torch.float64)
        experts = torch.randint(0, max(1, num_experts - 1), (num_tokens, top_k), generator=gen)  # last one unused
        if num_tokens >= 3:
            experts[0, 0], experts[1, -1], experts[2, 0] = -1, num_experts, 2**40  # dropped without validation
        want = sdk.lora_moe(x, lora_a, lora_b, weights, experts, scaling=1.5, backend="torch", validate=False)
        for backend in _backends("lora_moe", device):
            for strategy in ("grouped", "dense"):
                for layout in ("none", "contiguous", "transposed"):
                    leaves = [t.float().to(device).requires_grad_() for t in (x, lora_a, lora_b, weights)]
                    out = None
                    if layout == "contiguous":
                        out = torch.zeros(num_tokens, d_out, device=device)
                    elif layout == "transposed":
                        out = torch.zeros(d_out, num_tokens, device=device).T
                    y = sdk.lora_moe(*leaves, experts.to(device), scaling=1.5, out=out, backend=backend,
                                     validate=False, strategy=strategy)
                    y.sum().backward()
                    _close(y, want, f"lora_moe {backend}/{strategy} out={layout} T={num_tokens} E={num_experts} "
                           f"r={rank} k={top_k}", failures)


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


def infonce_cases(device, failures):
    import sparsedoctor_kernels as sdk

    gen = torch.Generator().manual_seed(2)
    for rows, num_experts, capacity, dim in ((0, 3, 4, 8), (5, 1, 3, 7), (31, 4, 9, 16), (70, 64, 5, 33)):
        query, positive = torch.randn(rows, dim, generator=gen), torch.randn(rows, dim, generator=gen)
        keys = torch.nn.functional.normalize(torch.randn(num_experts, capacity, dim, generator=gen), dim=-1)
        size = torch.randint(0, capacity + 1, (num_experts,), generator=gen)
        owner = torch.randint(-1, num_experts, (rows,), generator=gen)
        want = sdk.infonce_queue_loss(query, positive, (keys, size), owner, reduction="none", backend="torch",
                                      validate=False)
        for backend in _backends("infonce", device):
            leaves = [t.to(device).requires_grad_() for t in (query, positive)]
            got = sdk.infonce_queue_loss(*leaves, (keys.to(device), size.to(device)), owner.to(device),
                                         reduction="none", backend=backend, validate=False)
            got.sum().backward()
            _close(got, want, f"infonce {backend} N={rows} E={num_experts} Q={capacity} p={dim}", failures)


CASES = {"route": route_cases, "lora_moe": lora_moe_cases, "queue": queue_cases, "infonce": infonce_cases}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
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
