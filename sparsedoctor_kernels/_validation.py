"""Argument checks shared by the ops. None of them reads tensor data (no host sync) except `check_ids_in_range`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_dtype(name: str, tensor: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    require_tensor(name, tensor)
    if tensor.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {_dtype_names(allowed)}; got {tensor.dtype}")


def require_float(name: str, tensor: torch.Tensor) -> None:
    require_dtype(name, tensor, FLOAT_DTYPES)


def require_int(name: str, tensor: torch.Tensor) -> None:
    require_dtype(name, tensor, INT_DTYPES)


def require_shape(name: str, tensor: torch.Tensor, expected: Sequence[int | None], described: str) -> None:
    """`expected` holds a size per dim, None where any size is fine; `described` is the shape in the docs' letters."""
    shape = tuple(tensor.shape)
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
        raise ValueError(f"{name} must have shape {described}, got {list(shape)}")


def require_same_device(**tensors: torch.Tensor) -> torch.device:
    names = list(tensors)
    device = tensors[names[0]].device
    for name in names[1:]:
        if tensors[name].device != device:
            raise ValueError(
                f"{name} must be on the same device as {names[0]} ({device}), got {tensors[name].device}"
            )
    return device


def _byte_span(tensor: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses the tensor's elements can touch (torch strides are never negative)."""
    start = tensor.data_ptr()
    if tensor.is_contiguous():
        return start, start + tensor.numel() * tensor.element_size()
    extent = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return start, start + (extent + 1) * tensor.element_size()


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _inspectable(tensor: torch.Tensor) -> bool:
    """Real memory to compare (the caller has checked that torch.compile is not tracing): not fake or meta
    tensors, not empty. Plain tensors answer first: a decoding step checks a few per projection."""
    if type(tensor) in _PLAIN_TENSORS:
        return not tensor.is_meta and tensor.numel() != 0
    return tensor.numel() != 0 and not tensor.is_meta and not is_fake(tensor)  # is_fake is slow


def require_writable_output(name: str, out: torch.Tensor, **inputs: torch.Tensor) -> None:
    """An in-place output must not write one memory location twice (an expanded view) and must not share
    memory with any input: the op reads its inputs (and saves them for the backward) while it writes `out`."""
    if torch.compiler.is_compiling() or not _inspectable(out):
        return
    if not out.is_contiguous():  # a contiguous tensor has one location per element
        spans = sorted((stride, size) for size, stride in zip(out.shape, out.stride()) if size > 1)
        reach = 1
        for stride, size in spans:
            if stride < reach:
                raise ValueError(f"{name} has overlapping elements (shape {list(out.shape)}, strides "
                                 f"{list(out.stride())}, e.g. an expanded view): an in-place result needs one memory "
                                 f"location per element; pass a tensor of its own (for example {name}.contiguous())")
            reach = stride * size
    out_low, out_high = _byte_span(out)
    device = out.device
    for input_name, tensor in inputs.items():
        # Byte spans, whichever storage object holds them: two storages can alias one buffer (from_numpy, dlpack).
        if not _inspectable(tensor) or tensor.device != device:
            continue
        low, high = _byte_span(tensor)
        if low < out_high and out_low < high:
            raise ValueError(f"{name} shares memory with {input_name}: the op reads {input_name} (and keeps it for "
                             f"the backward) while writing {name} in place; give {name} memory of its own (e.g. "
                             f"{name}={input_name}.clone()) or add the result out of place")


def require_positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def require_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    return float(value)


def check_ids_in_range(name: str, ids: torch.Tensor, num_experts: int) -> None:
    """Raise ValueError for expert ids outside [0, E). Reads the data: only under validate=True."""
    _check_in_range(name, ids, num_experts, "expert id", "E")


def check_rows_in_range(name: str, rows: torch.Tensor, num_rows: int) -> None:
    """Raise ValueError for row indices outside [0, T). Reads the data: only under validate=True."""
    _check_in_range(name, rows, num_rows, "row", "T")


def _check_in_range(name: str, values: torch.Tensor, limit: int, what: str, size_name: str) -> None:
    if values.numel() == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= limit:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds {what} {bad}, outside [0, {limit}) for {size_name}={limit}")


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32 accumulation for float32/16-bit inputs; float64 stays float64 (used by gradcheck)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
