"""Shared argument checks and backend dispatch for the ops.

Every check here reads only host-side facts (dtype, device, shape, Python ints), so validating never
syncs with the device. Checks run before any output is written.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INDEX_DTYPES = (torch.int32, torch.int64)
BACKENDS = (None, "triton", "torch")

# Largest number of KV-cache groups one launch serves. Group tensors are passed as separate kernel
# arguments (the interpreter cannot follow pointers loaded from memory); more groups take more
# launches.
MAX_GROUPS_PER_LAUNCH = 4


@functools.cache
def has_triton() -> bool:
    """Whether the Triton kernels can run here: a CUDA device is present (or the interpreter is on)."""
    return INTERPRET or torch.cuda.is_available()


def use_triton(backend: str | None, *tensors: torch.Tensor) -> bool:
    """Resolves ``backend`` (None: Triton for CUDA tensors or under the interpreter, else torch)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of None, 'triton', 'torch', got {backend!r}")
    if backend == "torch":
        return False
    on_cuda = tensors[0].is_cuda
    if backend == "triton":
        if not (on_cuda or INTERPRET):
            raise ValueError(
                "backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
                f"got tensors on {tensors[0].device}"
            )
        return True
    return on_cuda or INTERPRET


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    ndim: int | None = None,
    device: torch.device | None = None,
    min_numel: int | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Raises ``TypeError``/``ValueError`` naming ``name`` unless ``t`` fits; returns ``t``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_dtype_names(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimension(s), got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if min_numel is not None and t.numel() < min_numel:
        raise ValueError(f"{name}: expected at least {min_numel} elements, got {t.numel()}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    return t


def check_index_vector(
    name: str, t: object, *, device: torch.device | None, min_numel: int | None = None
) -> torch.Tensor:
    """A contiguous 1-D int32/int64 tensor."""
    return check_tensor(name, t, dtypes=INDEX_DTYPES, ndim=1, device=device, min_numel=min_numel, contiguous=True)


def check_int(name: str, v: object, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name}: expected an int <= {maximum}, got {v}")
    return v


def check_int32(name: str, v: object) -> int:
    """An int that fits an int32 element (a value stored into an int32 table)."""
    return check_int(name, v, minimum=-(2**31), maximum=2**31 - 1)


def check_int_list(name: str, values: object, *, minimum: int | None = None) -> list[int]:
    """Host-side integers (a list, tuple or integer numpy array), returned as Python ints.

    Each element must be an ``int`` or numpy integer: a float is a ``TypeError`` (never truncated), as
    are ``None``, a bool and a tensor element (reading a device tensor would sync).
    """
    if isinstance(values, (str, bytes, torch.Tensor)) or not isinstance(values, Iterable):
        raise TypeError(f"{name}: expected a list of ints, got {type(values).__name__}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name}: expected ints, got {type(v).__name__} {v!r} at index {i}")
        v = int(v)
        if minimum is not None and v < minimum:
            raise ValueError(f"{name}: expected ints >= {minimum}, got {v} at index {i}")
        out.append(v)
    return out


def check_fill_value(name: str, value: object, dtype: torch.dtype) -> int | float:
    """A number that tensors of ``dtype`` hold as it is, returned as the Python int or float stored.

    ``TypeError`` for anything but a real number (a bool included); ``ValueError`` for NaN, an
    infinity, a value outside an integer dtype's range or with a fraction, and a finite value that
    rounds to an infinity (or, in a float8 type without one, NaN) in a float dtype.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    kind = _dtype_names((dtype,))
    if dtype.is_floating_point or dtype.is_complex:
        try:
            f = float(value)
        except OverflowError:
            raise ValueError(f"{name}: {kind} cannot hold an int of {len(str(abs(int(value))))} digits") from None
        if not math.isfinite(f):
            raise ValueError(f"{name}: expected a finite number, got {f}")
        stored = torch.tensor(f, dtype=torch.float64).to(dtype)
        if not bool(torch.isfinite(stored)):
            raise ValueError(f"{name}: {value} is out of range for {kind} (it would be stored as {stored.item()})")
        return float(stored.real.item()) if dtype.is_complex else float(stored.item())
    if isinstance(value, numbers.Integral):
        v = int(value)
    else:
        f = float(value)
        if not math.isfinite(f):
            raise ValueError(f"{name}: expected a finite number, got {f}")
        if not f.is_integer():
            raise ValueError(f"{name}: {kind} holds integers only, got {value}")
        v = int(f)
    lo, hi = (0, 1) if dtype == torch.bool else (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
    if not lo <= v <= hi:
        raise ValueError(f"{name}: {kind} cannot hold {v} (range [{lo}, {hi}])")
    return v


def check_fits(name: str, dtype: torch.dtype, largest: int, smallest: int = 0) -> None:
    """``ValueError`` naming ``name`` (an output) unless integer ``dtype`` holds ``[smallest, largest]``."""
    info = torch.iinfo(dtype)
    bad = largest if largest > info.max else smallest if smallest < info.min else None
    if bad is not None:
        raise ValueError(f"{name}: {_dtype_names((dtype,))} cannot hold {bad}, a value this call writes there")


def is_host(t: torch.Tensor) -> bool:
    """Whether the checks may read ``t``'s values: a CPU tensor. Reading a device tensor would sync, so
    its values are the caller's responsibility."""
    return t.device.type == "cpu"


def check_host_nonnegative(name: str, t: torch.Tensor, what: str = "lengths") -> None:
    """Values of a CPU tensor ``>= 0``; a device tensor is not read."""
    if is_host(t) and t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name}: expected non-negative {what}, got {int(t.min())}")


def host_sum(name: str, *terms: torch.Tensor) -> torch.Tensor:
    """Elementwise int64 sum of non-negative host tensors; ``ValueError`` naming ``name`` where a sum
    passes the int64 range (never wrapped)."""
    total = terms[0].long()
    for term in terms[1:]:
        total = total + term.long()
        # Non-negative terms below 2^63: a sum that passes 2^63 - 1 wraps to a negative one.
        if total.numel() and int(total.min()) < 0:
            raise ValueError(f"{name}: values sum past the int64 range")
    return total


def check_unit_column_stride(name: str, t: torch.Tensor) -> None:
    """Rows may be strided (column slices of a wider buffer), columns must be contiguous."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected unit column stride, got strides {t.stride()}")


def check_host_index_range(name: str, idx: torch.Tensor, upper: int, what: str = "request slots") -> None:
    """Values of a CPU index tensor in ``[0, upper)``; device tensors are not read (that would sync)."""
    if idx.is_cuda or idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name}: expected {what} in [0, {upper}), got values in [{lo}, {hi}]")


def check_group_lists(first_name: str, first: Sequence[object], **others: Sequence[object]) -> int:
    """Per-group argument lists: at least one group, all of the same length. Returns the count."""
    num_groups = len(first)
    if num_groups == 0:
        raise ValueError(f"{first_name}: expected at least one group, got none")
    bad = {name: len(v) for name, v in others.items() if len(v) != num_groups}
    if bad:
        names = ", ".join(bad)
        raise ValueError(
            f"{names}: expected {num_groups} groups each (len({first_name})), got {', '.join(map(str, bad.values()))}"
        )
    return num_groups


def group_launches(num_groups: int) -> Iterator[tuple[int, list[int]]]:
    """Splits groups into launches of up to :data:`MAX_GROUPS_PER_LAUNCH`.

    Yields ``(groups_in_launch, arg_groups)`` where ``arg_groups`` names the group bound to each of the
    kernel's ``MAX_GROUPS_PER_LAUNCH`` argument sets; unused ones repeat the launch's first group
    (valid tensors, never read: the kernel's ``NUM_GROUPS`` constexpr prunes them).
    """
    for first in range(0, num_groups, MAX_GROUPS_PER_LAUNCH):
        n = min(MAX_GROUPS_PER_LAUNCH, num_groups - first)
        yield n, [first + (i if i < n else 0) for i in range(MAX_GROUPS_PER_LAUNCH)]


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))
