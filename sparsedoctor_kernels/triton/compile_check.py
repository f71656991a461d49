"""Compile every Triton kernel ahead of time for an NVIDIA target, with no GPU needed.

The interpreter runs the kernels' logic on CPU but never compiles them; this catches what only the compiler
sees (types, layouts, unsupported operations, dot-shape limits) for each dtype variant the launchers use, and
reports shared memory, registers and stack bytes (cuobjdump, bundled with Triton).

    python -m sparsedoctor_kernels.triton.compile_check            # sm_90 (Hopper)
    python -m sparsedoctor_kernels.triton.compile_check --arch 80

It must run without TRITON_INTERPRET=1 (kernels are then compiled, not interpreted).

What is compiled is what the GPU runs. The launchers themselves (`forward`, `backward`, `enqueue`, ... of
routing.py, lora_moe.py, queue.py and infonce.py) are called on CPU tensors of representative training shapes
(below) with every kernel's launch intercepted, so tile sizes, num_warps and constexpr flags are the launchers'
own; the recorded arguments then go through the Triton JIT's own specialisation helper, as at a real launch:
pointers and integers divisible by 16 get `tt.divisibility = 16` and integers equal to 1 (unit strides) become
constants. One launcher choice depends on the device and is replaced by its CUDA value (`_ON_CUDA`). A kernel
launched with other argument values (another shape, an odd stride) is specialised differently on the GPU.
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
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

# Representative launches: a training micro-batch at the Qwen3-4B q_proj shape with SparseDoctorConfig's
# defaults (E=8 experts, top-2, rank 16, scaling 32 / 16), the widest routing the CUDA backend takes, the
# default contrastive subset and queue size, and projection dim 128 (the InfoNCE tiles were sized for it).
TOKENS = 4096
SMALL_BATCH_TOKENS = 512  # issue 23's small-model batch, 4 x 128
D_IN, D_OUT = 2560, 4096
EXPERTS, TOP_K, RANK, SCALING = 8, 2, 16, 2.0
WIDE_EXPERTS, WIDE_TOP_K = 256, 8
QUEUE_ROWS, CAPACITY, DIM = 256, 1024, 128

# Launcher choices that depend on the tensors' device: kernel -> {constexpr: (value off CUDA, value on CUDA)}.
# infonce.forward runs fp32 scores in tf32x3 on CUDA tensors and in IEEE fp32 elsewhere.
_ON_CUDA = {"_infonce_forward_kernel": {"PRECISION": ("ieee", "tf32x3")}}


class UnsupportedTriton(RuntimeError):
    """The installed Triton's JIT does not expose the specialisation steps this check relies on."""


@dataclass
class Scenario:
    module: str  # sparsedoctor_kernels.triton.<module>
    label: str  # printed before the kernel's own flags
    run: Callable[[], object]  # calls the module's launchers on CPU tensors
    uses: tuple[str, ...] = ()  # other modules whose kernels those launchers launch


@dataclass
class Launch:
    fn: object  # the JITFunction
    variant: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: object
    num_divisible: int
    num_unit: int


def _scenarios() -> tuple[dict[str, str], list[Scenario]]:
    """Per module a description of its representative launches, and the launcher calls that make them."""
    import torch

    from sparsedoctor_kernels.triton import group_infonce, infonce, lora_moe, lora_moe_dense, queue, routing

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    scenarios = []

    def route(dtype, num_experts, top_k):
        # TOKENS take a program per tile and the statistics kernel; SMALL_BATCH_TOKENS one program per routing.
        for tokens in (TOKENS, SMALL_BATCH_TOKENS):
            logits = torch.empty(tokens, num_experts, dtype=dtype)
            for token_mask in (None, torch.ones(tokens, dtype=torch.bool)):  # the model passes its padding mask
                weights, experts, _, probs_mean = routing.forward(logits, top_k, True, token_mask)
                routing.backward(torch.empty_like(weights), torch.empty_like(probs_mean), logits, experts, True,
                                 token_mask)

    for name, dtype in dtypes.items():
        for num_experts, top_k in ((EXPERTS, TOP_K), (WIDE_EXPERTS, WIDE_TOP_K)):
            scenarios.append(Scenario("routing", f"{name} E={num_experts}",
                                      lambda d=dtype, e=num_experts, k=top_k: route(d, e, k)))

    def experts_layer(strategy, dtype, num_experts=EXPERTS, top_k=TOP_K, rank=RANK):
        x = torch.empty(TOKENS, D_IN, dtype=dtype)
        lora_a = torch.empty(num_experts, rank, D_IN, dtype=dtype)
        lora_b = torch.empty(num_experts, D_OUT, rank, dtype=dtype)
        weights = torch.zeros(TOKENS, top_k)  # route's weights are float32
        experts = torch.randint(0, num_experts, (TOKENS, top_k), dtype=torch.int32)
        y, h, plan = strategy.forward(x, lora_a, lora_b, weights, experts, SCALING)
        strategy.forward_into(x, lora_a, lora_b, weights, experts, SCALING, torch.empty_like(y))
        strategy.backward(torch.empty_like(y), x, lora_a, lora_b, weights, experts, h, plan, SCALING)
        if hasattr(strategy, "regate_forward"):  # the model's contrastive views: each picked token twice
            rows = torch.randint(0, TOKENS, (2 * QUEUE_ROWS,))
            rows_weights, rows_experts = weights[: rows.shape[0]], experts[: rows.shape[0]]
            y_rows, h = strategy.regate_forward(x, lora_a, lora_b, weights, experts, SCALING, torch.empty_like(y),
                                                True, rows, rows_weights, rows_experts)
            # The launches are recorded, not run, so the safe row indices the shrink would write are garbage:
            # the scatter-add between the launches (torch, not a Triton kernel) is skipped here.
            with mock.patch.object(torch.Tensor, "index_put_", lambda self, *args, **kwargs: self):
                strategy.regate_backward(torch.empty_like(y), torch.empty_like(y_rows), x, lora_a, lora_b, weights,
                                         experts, h, rows, rows_weights, rows_experts, SCALING)

    for name, dtype in dtypes.items():
        scenarios.append(Scenario("lora_moe", name, lambda d=dtype: experts_layer(lora_moe, d)))
    for name, dtype in dtypes.items():
        scenarios.append(Scenario("lora_moe_dense", name, lambda d=dtype: experts_layer(lora_moe_dense, d)))
        # E*r = 512: the shrink holds 128 rank-space columns a program and loops over four blocks.
        scenarios.append(Scenario("lora_moe_dense", f"{name} E={WIDE_EXPERTS // 4} k=4 r=8",
                                  lambda d=dtype: experts_layer(lora_moe_dense, d, WIDE_EXPERTS // 4, 4, 8)))
        # q/k/v as one sibling group (sibling_lora_moe launches the dense kernels): the stacked shrink reading
        # each sibling's gates in place, the expands and backward shrinks on column blocks of one buffer.
        scenarios.append(Scenario("lora_moe_dense", f"{name} siblings q/k/v",
                                  lambda d=dtype: sibling_layer(d)))

    def sibling_layer(dtype, widths=(D_OUT, D_OUT // 4, D_OUT // 4)):
        from sparsedoctor_kernels.triton import sibling_lora_moe

        x = torch.empty(TOKENS, D_IN, dtype=dtype)
        lora_a = torch.empty(len(widths), EXPERTS, RANK, D_IN, dtype=dtype)
        lora_b = [torch.empty(EXPERTS, width, RANK, dtype=dtype) for width in widths]
        weights = torch.zeros(len(widths), TOKENS, TOP_K)
        experts = torch.randint(0, EXPERTS, (len(widths), TOKENS, TOP_K), dtype=torch.int32)
        outs = [torch.empty(TOKENS, width, dtype=dtype) for width in widths]
        h = sibling_lora_moe.forward_into(x, lora_a, lora_b, weights, experts, SCALING, outs)
        sibling_lora_moe.backward(outs, x, lora_a, lora_b, weights, experts, h, SCALING)

    def routed_siblings(dtype, widths, tokens, p):
        from sparsedoctor_kernels.triton import routed_sibling_lora_moe

        x = torch.empty(tokens, D_IN, dtype=dtype)
        routers = [torch.empty(EXPERTS, D_IN, dtype=dtype) for _ in widths]
        lora_a = [torch.empty(EXPERTS, RANK, D_IN, dtype=dtype) for _ in widths]
        lora_b = [torch.empty(EXPERTS, width, RANK, dtype=dtype) for width in widths]
        outs = [torch.empty(tokens, width, dtype=dtype) for width in widths]
        seed, mask = torch.zeros(1, dtype=torch.int64), torch.ones(tokens, dtype=torch.bool)
        logits, weights, experts, _, probs_mean, h = routed_sibling_lora_moe.forward_into(
            x, routers, lora_a, lora_b, TOP_K, SCALING, p, seed, True, mask, outs)
        routed_sibling_lora_moe.backward(outs, logits, None, probs_mean, x, routers, lora_a, lora_b, logits, weights,
                                         experts, h, seed, p, SCALING, True, mask)

    # A training layer's adapter pass (routers, routing, experts): q/k/v and o_proj alone, with the default
    # dropout at the small-model batch and without at TOKENS (the routing's multi-program grid).
    for name, dtype in dtypes.items():
        for label, widths in (("q/k/v", (D_OUT, D_OUT // 4, D_OUT // 4)), ("one", (D_IN,))):
            for tokens, p in ((SMALL_BATCH_TOKENS, 0.05), (TOKENS, 0.0)):
                scenarios.append(Scenario("routed_sibling_lora_moe", f"{name} {label} T={tokens} p={p}",
                                          lambda d=dtype, w=widths, t=tokens, q=p: routed_siblings(d, w, t, q),
                                          uses=("lora_moe_dense", "routing")))

    def queue_state(num_experts, dtype):
        return (torch.empty(num_experts, CAPACITY, DIM, dtype=dtype), torch.zeros(num_experts, dtype=torch.int64),
                torch.zeros(num_experts, dtype=torch.int64))

    def positions(ids_dtype, num_experts):
        ids = torch.randint(0, num_experts, (QUEUE_ROWS,), dtype=ids_dtype)
        queue.enqueue_destinations(*queue_state(num_experts, torch.float32), ids)

    def enqueue(keys_dtype, stored_dtype):
        # int64 ids at E=8 (the model's): this launch of the position scan repeats one compiled above.
        ids = torch.randint(0, EXPERTS, (QUEUE_ROWS,), dtype=torch.int64)
        queue.enqueue(*queue_state(EXPERTS, stored_dtype), torch.empty(QUEUE_ROWS, DIM, dtype=keys_dtype), ids)

    for ids_name, ids_dtype in (("i32", torch.int32), ("i64", torch.int64)):
        for num_experts in (EXPERTS, WIDE_EXPERTS):
            scenarios.append(Scenario("queue", f"{ids_name} E={num_experts}",
                                      lambda d=ids_dtype, e=num_experts: positions(d, e)))
    for keys, stored in (("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16")):
        scenarios.append(Scenario("queue", f"{keys}->{stored}",
                                  lambda k=dtypes[keys], s=dtypes[stored]: enqueue(k, s)))

    def contrastive(keys_dtype):
        query, positive = torch.empty(QUEUE_ROWS, DIM), torch.empty(QUEUE_ROWS, DIM)
        queue_keys, _, size = queue_state(EXPERTS, keys_dtype)
        experts = torch.randint(0, EXPERTS, (QUEUE_ROWS,), dtype=torch.int64)
        infonce.forward(query, positive, queue_keys, size, experts, 0.07, True)

    for keys in ("fp32", "bf16"):
        scenarios.append(Scenario("infonce", f"queue {keys}", lambda k=dtypes[keys]: contrastive(k)))

    def router_term(rows, dim, groups):
        group_infonce.forward(torch.empty(rows, dim), torch.zeros(rows, dtype=torch.int64), groups, 0.07)

    # The model's router term: the default subset of QUEUE_ROWS tokens at E=8 experts and 8 sequences, and the
    # largest tiles the automatic choice gives the kernel (16 sequences; 64 rows of 64 experts).
    for rows, dim, groups in ((QUEUE_ROWS, EXPERTS, 8), (QUEUE_ROWS, 16, 16), (64, 64, 64)):
        scenarios.append(Scenario("group_infonce", f"n={rows} d={dim} S={groups}",
                                  lambda r=rows, d=dim, g=groups: router_term(r, d, g)))

    described = {
        "routing": f"T={TOKENS}, E={EXPERTS} k={TOP_K} and E={WIDE_EXPERTS} k={WIDE_TOP_K}, forward and backward",
        "lora_moe": f"T={TOKENS}, d_in={D_IN} d_out={D_OUT} (Qwen3-4B q_proj), E={EXPERTS} k={TOP_K} r={RANK}, "
                    "forward, forward with out=, backward",
        "lora_moe_dense": f"as lora_moe, and E={WIDE_EXPERTS // 4} k=4 r=8, and q/k/v as one sibling_lora_moe group",
        "routed_sibling_lora_moe": f"q/k/v and one projection, E={EXPERTS} k={TOP_K} r={RANK}, T={SMALL_BATCH_TOKENS} "
                                   f"with dropout and T={TOKENS} without, forward and backward",
        "queue": f"N={QUEUE_ROWS} rows into E x Q={CAPACITY} x p={DIM}",
        "infonce": f"N={QUEUE_ROWS} queries, E={EXPERTS} x Q={CAPACITY} x p={DIM} queue, fp32 queries",
        "group_infonce": "the router term, one program (fp32 routing probabilities)",
    }
    return described, scenarios


def _capture(modules: list, run: Callable[[], object]) -> list[tuple]:
    """(kernel, args, kwargs) of every kernel launch `run` makes through the modules' kernels, none executed."""
    from triton.runtime.jit import JITFunction

    launches = []
    patched = []
    for fn in {id(f): f for module in modules for f in vars(module).values()}.values():
        if isinstance(fn, JITFunction) and "run" not in vars(fn):
            def record(*args, grid, warmup, _fn=fn, **kwargs):
                launches.append((_fn, args, dict(kwargs)))
            fn.run = record  # fn[grid](...) calls self.run: the instance attribute shadows JITFunction.run
            patched.append(fn)
    try:
        run()
    finally:
        for fn in patched:
            del fn.run
    return launches


def _apply_cuda_choices(fn, kwargs: dict) -> dict:
    choices = _ON_CUDA.get(fn.__name__, {})
    kwargs = dict(kwargs)
    for name, (off_cuda, on_cuda) in choices.items():
        if kwargs.get(name) != off_cuda:
            raise RuntimeError(f"{fn.__name__}: the launcher passed {name}={kwargs.get(name)!r} for CPU tensors, "
                               f"expected {off_cuda!r}; update compile_check._ON_CUDA to its CUDA choice")
        kwargs[name] = on_cuda
    return kwargs


_binders: dict = {}


def _jit_specialisation(fn, backend, args: tuple, kwargs: dict):
    """(options, signature, constexprs, attrs) as JITFunction.run derives them for this launch.

    The JIT's own helpers do the work: `create_function_from_signature` builds the binder that calls
    `specialize_impl` on every argument (the API of Triton 3.3 and later, without AttrsDescriptor), and
    `JITFunction._pack_args`, where the installed Triton has it, turns the binder's result into the compiler's
    inputs; releases without it did the same steps inline in `JITFunction.run`, repeated here."""
    import triton
    from triton.runtime import jit

    make_binder = getattr(jit, "create_function_from_signature", None)
    if make_binder is None or not hasattr(fn, "params"):
        raise UnsupportedTriton(f"Triton {triton.__version__} has no triton.runtime.jit.create_function_from_"
                                "signature (the JIT's argument specialisation); this check needs Triton >= 3.3")
    kwargs = dict(kwargs)
    try:
        from triton import knobs
        debug_default = knobs.runtime.debug
    except ImportError:
        debug_default = os.environ.get("TRITON_DEBUG", "0") == "1"
    kwargs["debug"] = kwargs.get("debug", getattr(fn, "debug", None)) or debug_default  # as JITFunction.run
    try:
        if fn not in _binders:
            _binders[fn] = make_binder(fn.signature, fn.params, backend)
        bound_args, specialization, options = _binders[fn](*args, **kwargs)
    except (TypeError, ValueError) as error:
        raise UnsupportedTriton(f"Triton {triton.__version__}: the JIT binder of {fn.__name__} did not return "
                                f"(arguments, specialisation, options) as in Triton >= 3.3 ({error})") from error
    if hasattr(fn, "_pack_args"):
        return fn._pack_args(backend, kwargs, bound_args, specialization, options)
    from triton._utils import find_paths_if, get_iterable_path

    options = backend.parse_options(kwargs)
    values = [x[0] for x in specialization]
    signature = dict(zip([p.name for p in fn.params], values))
    constexpr_paths = find_paths_if(values, lambda _, value: value == "constexpr")
    constexprs = {path: get_iterable_path(list(bound_args.values()), path) for path in constexpr_paths}
    attr_values = ["" if x[0] == "constexpr" else x[1] for x in specialization]
    attr_paths = find_paths_if(attr_values, lambda _, value: isinstance(value, str))
    attrs = {path: backend.parse_attr(get_iterable_path(attr_values, path)) for path in attr_paths}
    return options, signature, constexprs, attrs


def _flags(fn, kwargs: dict, launches: list[tuple]) -> str:
    """The boolean constexprs that tell this kernel's launches apart (e.g. `coef=True accumulate=False`) and
    the device-dependent choices replaced by their CUDA values."""
    flags = []
    for name, value in kwargs.items():
        varies = isinstance(value, bool) and len({k.get(name) for f, _, k in launches if f is fn}) > 1
        if varies or name in _ON_CUDA.get(fn.__name__, {}):
            flags.append(f"{name.lower().removeprefix('has_')}={value}")
    return " ".join(flags)


def _launches(target) -> tuple[list[tuple[str, str]], list[Launch | tuple[str, str, str]]]:
    """Module descriptions, then per distinct compilation a Launch, or (kernel, variant, error) for a launcher
    call or a launch that failed before compilation."""
    import importlib

    from triton.compiler.compiler import make_backend

    backend = make_backend(target)
    described, scenarios = _scenarios()
    captured = []
    results: list = []
    for scenario in scenarios:
        modules = [importlib.import_module(f"sparsedoctor_kernels.triton.{name}")
                   for name in (scenario.module, *scenario.uses)]
        try:
            launches = _capture(modules, scenario.run)
        except Exception as error:  # noqa: BLE001 - report the launcher's failure, then go on
            results.append((f"{scenario.module} launchers", scenario.label, _first_line(error)))
            continue
        captured.append((scenario, launches))
    all_launches = [launch for _, launches in captured for launch in launches]
    seen = set()
    for scenario, launches in captured:
        for fn, args, kwargs in launches:
            try:
                kwargs = _apply_cuda_choices(fn, kwargs)
                options, signature, constexprs, attrs = _jit_specialisation(fn, backend, args, kwargs)
            except UnsupportedTriton:
                raise
            except Exception as error:  # noqa: BLE001 - report the launch that cannot be specialised, go on
                results.append((fn.__name__, scenario.label, _first_line(error)))
                continue
            key = (fn.__name__, repr(signature), repr(sorted(constexprs.items(), key=repr)),
                   repr(sorted(attrs.items())), repr(options))
            if key in seen:
                continue
            seen.add(key)
            variant = " ".join(filter(None, [scenario.label, _flags(fn, kwargs, all_launches)]))
            # Runtime integers the JIT turned into constants (unit strides), and arguments known divisible by 16.
            unit = sum(1 for path, value in constexprs.items()
                       if not fn.params[path[0]].is_constexpr and isinstance(value, int) and value == 1)
            divisible = sum(1 for attr in attrs.values() if ["tt.divisibility", 16] in attr)
            results.append(Launch(fn, variant, signature, constexprs, attrs, options, divisible, unit))
    modules = list(dict.fromkeys(scenario.module for scenario in scenarios))
    return [(module, described[module]) for module in modules], results


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    print(f"Triton {triton.__version__}, target sm_{args.arch}; arguments specialised by the JIT's own helper "
          "for the launchers' launches at these shapes:")
    try:
        described, launches = _launches(target)
    except UnsupportedTriton as error:
        print(f"compile_check: {error}", file=sys.stderr)
        return 1
    for module, text in described:
        print(f"  {module}: {text}")
    failures = 0
    for launch in launches:
        if isinstance(launch, tuple):
            failures += 1
            print(f"FAIL  {launch[0]:<28} {launch[1]:<32} {launch[2]}")
            continue
        began = time.perf_counter()
        try:
            source = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
            compiled = triton.compile(source, target=target, options=launch.options.__dict__)
        except Exception as error:  # noqa: BLE001 - report every kernel's failure, then fail
            failures += 1
            print(f"FAIL  {launch.fn.__name__:<28} {launch.variant:<32} {_first_line(error)}")
            continue
        usage = _resource_usage(compiled.asm["cubin"])
        print(f"ok    {launch.fn.__name__:<28} {launch.variant:<32} smem {compiled.metadata.shared:>6} B, {usage}, "
              f"{launch.num_divisible} args %16, {launch.num_unit} =1, {time.perf_counter() - began:.1f} s")
    print(f"{failures} failed" if failures else "all kernels compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
