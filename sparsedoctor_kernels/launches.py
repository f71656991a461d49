"""Count the kernel launches of a piece of code, on the CPU: the host overhead a GPU would wait on.

Every aten op that computes (views, aliases and `empty` allocations launch nothing and are not counted) and
every Triton kernel launch is one launch. The ops' own custom ops (`sparsedoctor::*`) are entered, so the
launches inside them count, not the custom op itself. Triton kernels are counted under the interpreter too
(TRITON_INTERPRET=1), so the figure is measurable without a GPU.

    from sparsedoctor_kernels.launches import count_launches
    counts = count_launches(lambda: layer(x).sum().backward())
    print(counts.total, counts.most_common(5))
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that allocate or reinterpret memory without a kernel.
_FREE_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
             "lift_fresh", "_local_scalar_dense", "set_", "resize_", "_reshape_alias", "unsafe_view", "view",
             "_unsafe_view", "as_strided", "sym_size", "sym_stride", "sym_numel", "is_same_size"}
OWN_NAMESPACE = "sparsedoctor"


def _backend_keys(args) -> torch._C.DispatchKeySet:
    """The dispatch key of the device the custom op's tensors live on: its kernel, below every mode."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    key = torch._C.DispatchKey.CUDA if device.type == "cuda" else torch._C.DispatchKey.CPU
    return torch._C.DispatchKeySet(key)


class LaunchCounts(Counter):
    """name -> launches; aten ops as `aten.<name>`, Triton kernels as `triton.<kernel name>`."""

    inside_triton = 0  # > 0 while a Triton launch runs: the interpreter's own tensor copies are not launches

    @property
    def total(self) -> int:
        return sum(self.values())

    @property
    def triton(self) -> int:
        return sum(n for name, n in self.items() if name.startswith("triton."))

    @property
    def aten(self) -> int:
        return self.total - self.triton


class _CountAten(TorchDispatchMode):
    def __init__(self, counts: LaunchCounts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace = func.namespace
        if namespace == OWN_NAMESPACE:
            # Count what the custom op launches, not the op itself: run its kernel (the keys below this mode's)
            # with the mode pushed again, so the ops inside it pass through here.
            with self:
                return func.redispatch(_backend_keys(args), *args, **kwargs)
        name = func.overloadpacket.__name__
        if namespace == "aten" and not func.is_view and name not in _FREE_OPS and not self.counts.inside_triton:
            self.counts[f"aten.{name}"] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def _count_triton(counts: LaunchCounts):
    """Wrap the launch entry point of Triton's JIT (and of the interpreter) for the duration."""
    patched = []
    try:
        from triton.runtime.interpreter import InterpretedFunction
        patched.append((InterpretedFunction, "run"))
    except ImportError:
        pass
    try:
        from triton.runtime.jit import JITFunction
        patched.append((JITFunction, "run"))
    except ImportError:
        pass
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr in patched]

    def counting(original):
        def run(self, *args, **kwargs):
            function = getattr(self, "fn", None)
            counts[f"triton.{getattr(function, '__name__', type(self).__name__)}"] += 1
            counts.inside_triton += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                counts.inside_triton -= 1
        return run

    try:
        for owner, attr, original in originals:
            setattr(owner, attr, counting(original))
        yield
    finally:
        for owner, attr, original in originals:
            setattr(owner, attr, original)


def count_launches(fn: Callable[[], object]) -> LaunchCounts:
    """Run `fn` once and count its kernel launches (autograd's backward included when `fn` calls it)."""
    counts = LaunchCounts()
    with _count_triton(counts), _CountAten(counts):
        fn()
    return counts


def report(counts: LaunchCounts, top: int = 12) -> str:
    lines = [f"{counts.total} launches ({counts.aten} aten, {counts.triton} Triton)"]
    lines += [f"  {n:4d}  {name}" for name, n in counts.most_common(top)]
    return "\n".join(lines)
