"""Compile every Triton kernel ahead of time for an NVIDIA target, with no GPU needed.

The interpreter runs the kernels' logic on CPU but never compiles them; this catches what only the compiler
sees (types, layouts, unsupported operations, dot-shape limits) for each dtype variant the launchers use, and
reports shared memory, registers and stack bytes (cuobjdump, bundled with Triton).

    python -m sparsedoctor_kernels.triton.compile_check            # sm_90 (Hopper)
    python -m sparsedoctor_kernels.triton.compile_check --arch 80

It must run without TRITON_INTERPRET=1 (kernels are then compiled, not interpreted).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field


@dataclass
class Case:
    module: str
    kernel: str
    variant: str
    pointers: dict[str, str]  # argument -> element type ("fp32", "bf16", "i32", ...)
    constexprs: dict
    floats: tuple[str, ...] = ()
    ints64: tuple[str, ...] = field(default=())
    num_warps: int = 4


def _cases():
    import triton.language as tl

    from sparsedoctor_kernels.triton import infonce, lora_moe, queue, routing

    names = {tl.float32: "fp32", tl.bfloat16: "bf16", tl.float16: "fp16", tl.float64: "fp64"}
    cases = []
    for dtype in ("fp32", "bf16", "fp16"):
        for experts, top_k, block_t in ((8, 2, 128), (256, 8, 16)):
            cases.append(Case("routing", "_route_forward_kernel", f"{dtype} E={experts}",
                              {"logits_ptr": dtype, "weights_ptr": "fp32", "experts_ptr": "i32", "counts_ptr": "i32",
                               "partial_probs_ptr": "fp32"},
                              dict(TOP_K=top_k, K_PAD=top_k, RENORMALIZE=True, BLOCK_T=block_t, BLOCK_E=experts,
                                   COMPUTE=tl.float32), num_warps=routing.num_warps(experts)))
            cases.append(Case("routing", "_route_backward_kernel", f"{dtype} E={experts}",
                              {"grad_weights_ptr": "fp32", "grad_probs_mean_ptr": "fp32", "logits_ptr": dtype,
                               "experts_ptr": "i32", "grad_logits_ptr": dtype},
                              dict(TOP_K=top_k, RENORMALIZE=True, BLOCK_T=block_t, BLOCK_E=experts,
                                   COMPUTE=tl.float32), floats=("inv_num_tokens",),
                              num_warps=routing.num_warps(experts)))
    torch_dtypes = __import__("torch")
    for torch_dtype in (torch_dtypes.float32, torch_dtypes.bfloat16, torch_dtypes.float16):
        dot = lora_moe._dot_config(torch_dtype, torch_dtypes.float32)
        dtype = names[dot["DOT"]]
        blocks = dict(BLOCK_M=lora_moe.BLOCK_M, BLOCK_R=16, **dot)
        for backward in (False, True):
            cases.append(Case("lora_moe", "_shrink_kernel", f"{dtype} {'backward' if backward else 'forward'}",
                              {"src_ptr": dtype, "weight_ptr": dtype, "order_ptr": "i32", "tiles_ptr": "i32",
                               "proj_ptr": "fp32", "h_ptr": "fp32", "coef_ptr": "fp32", "grad_gate_ptr": "fp32"},
                              dict(BACKWARD=backward, BLOCK_D=lora_moe.BLOCK_D, **blocks)))
        for has_coef, accumulate in ((True, False), (True, True), (False, True)):
            cases.append(Case("lora_moe", "_expand_kernel", f"{dtype} coef={has_coef} accumulate={accumulate}",
                              {"proj_ptr": "fp32", "coef_ptr": "fp32", "weight_ptr": dtype, "out_ptr": dtype,
                               "order_ptr": "i32", "tiles_ptr": "i32"},
                              dict(HAS_COEF=has_coef, ACCUMULATE=accumulate, BLOCK_N=lora_moe.BLOCK_N, **blocks)))
        for has_coef in (False, True):
            cases.append(Case("lora_moe", "_expert_grad_kernel", f"{dtype} coef={has_coef}",
                              {"proj_ptr": "fp32", "coef_ptr": "fp32", "src_ptr": dtype, "out_ptr": dtype,
                               "order_ptr": "i32", "bounds_ptr": "i32"},
                              dict(HAS_COEF=has_coef, BLOCK_N=lora_moe.BLOCK_N, **blocks)))
    for ids in ("i32", "i64"):
        for experts in (8, 256):
            block_n = max(16, min(1024, queue.SCAN_ELEMENTS // experts))
            cases.append(Case("queue", "_enqueue_positions_kernel", f"{ids} E={experts}",
                              {"experts_ptr": ids, "ptr_ptr": "i64", "size_ptr": "i64", "dest_ptr": "i64"},
                              dict(BLOCK_N=block_n, BLOCK_E=experts), num_warps=queue.SCAN_WARPS))
    for keys, stored in (("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16")):
        cases.append(Case("queue", "_enqueue_copy_kernel", f"{keys}->{stored}",
                          {"keys_ptr": keys, "dest_ptr": "i64", "queue_ptr": stored}, dict(BLOCK_N=32, BLOCK_D=128)))
    for keys, precision in (("fp32", "tf32x3"), ("bf16", "tf32x3"), ("fp32", "ieee")):
        cases.append(Case("infonce", "_infonce_forward_kernel", f"queue {keys} {precision}",
                          {"query_ptr": "fp32", "positive_ptr": "fp32", "keys_ptr": keys, "size_ptr": "i64",
                           "experts_ptr": "i64", "loss_ptr": "fp32", "grad_query_ptr": "fp32",
                           "positive_coef_ptr": "fp32"},
                          dict(BLOCK_N=max(16, min(64, infonce.TILE_ELEMENTS // 128)), BLOCK_Q=infonce.BLOCK_Q,
                               BLOCK_P=128, COMPUTE=tl.float32,
                               PRECISION=precision), num_warps=infonce.NUM_WARPS))
    return cases


def _signature(fn, case: Case) -> dict[str, str]:
    signature = {}
    for name in fn.arg_names:
        if name in case.constexprs:
            signature[name] = "constexpr"
        elif name in case.pointers:
            signature[name] = "*" + case.pointers[name]
        elif name.endswith("_ptr"):
            raise ValueError(f"{case.kernel}: no element type given for pointer argument {name}")
        elif name in case.floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if name in case.ints64 else "i32"
    return signature


def _cuobjdump() -> str | None:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.isfile(bundled) else shutil.which("cuobjdump")


def _resource_usage(cubin: bytes) -> str:
    """Registers and stack (spill) bytes of the compiled kernel, read with cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return "registers: no cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        report = subprocess.run([tool, "--dump-resource-usage", handle.name], capture_output=True, text=True)
    registers = re.search(r"REG:(\d+)", report.stdout)
    stack = re.search(r"STACK:(\d+)", report.stdout)
    return f"{registers.group(1) if registers else '?':>3} regs, stack {stack.group(1) if stack else '?'} B"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (Hopper) or 80")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)",
              file=sys.stderr)
        return 2
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    print(f"Triton {triton.__version__}, target sm_{args.arch}")
    for case in _cases():
        fn = getattr(importlib.import_module(f"sparsedoctor_kernels.triton.{case.module}"), case.kernel)
        began = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(fn, _signature(fn, case), constexprs=case.constexprs),
                                      target=target, options={"num_warps": case.num_warps})
        except Exception as error:  # noqa: BLE001 - report every kernel's failure, then fail
            failures += 1
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            print(f"FAIL  {case.kernel:<28} {case.variant:<32} {first}")
            continue
        usage = _resource_usage(compiled.asm["cubin"])
        print(f"ok    {case.kernel:<28} {case.variant:<32} smem {compiled.metadata.shared:>6} B, {usage}, "
              f"{time.perf_counter() - began:.1f} s")
    print(f"{failures} failed" if failures else "all kernels compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
