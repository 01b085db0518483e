"""Launch-overhead cache for Triton kernels.

A plain ``kernel[grid](*args)`` spends most of its host time binding arguments: building the
specialization of every argument, hashing it with the options into Triton's cache key, and reading
knobs. For the small metadata kernels that run every step this binding costs far more than the
kernel. :class:`CachedKernel` does the binding once per specialization: the first launch goes
through Triton's normal path, the compiled kernel it returns is remembered under a key of our own,
and later launches with the same key call the compiled kernel's launcher directly.

The key is at least as fine as Triton's specialization, so a hit always selects the binary Triton
would have selected:

- tensors: dtype and ``data_ptr() % 16`` (Triton specializes on 16-byte alignment);
- ints: ``== 1``, ``% 16``, and the 32/64-bit range (i32 / i64 / u64);
- bools and ``None`` by value; floats by type (Triton passes them as fp32, never specialized);
- constexpr parameters by value;
- ``num_warps``, ``num_stages`` and the current CUDA device.

Anything the key cannot describe (other objects, unhashable constexprs, a registered launch
hook, a pre-run hook, the Triton interpreter, a Triton version outside 3.6-3.9) takes Triton's
normal launch path: a cache miss is never a wrong result, only a slower launch.

Global Triton knobs that change compilation (``TRITON_DEBUG`` and the like) are read by Triton at
each normal launch but not by the cached path; call :func:`clear_launch_caches` after changing them.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import triton

__all__ = [
    "CachedKernel",
    "cached_kernel",
    "clear_launch_caches",
    "launch_cache_enabled",
    "set_launch_cache_enabled",
]


def _triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


# The cached path calls ``CompiledKernel.run(grid0, grid1, grid2, stream, function, packed_metadata,
# launch_metadata, enter_hook, exit_hook, *args)``, the call JITFunction.run makes in Triton 3.6-3.9.
_VERIFIED_TRITON = (3, 6) <= _triton_version() < (3, 10)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_enabled = os.environ.get("BATCHMETA_LAUNCH_CACHE", "1") != "0"
_instances: weakref.WeakSet[CachedKernel] = weakref.WeakSet()

_I32_MIN = -(2**31)
_I32_MAX = 2**31 - 1
_I64_MAX = 2**63 - 1


class _Unkeyable(Exception):
    """An argument the key cannot describe: take Triton's normal path."""


def _other_key(a: Any) -> Any:
    # Slow branch of the generated key function for anything but a plain tensor or int.
    if a is None or type(a) is bool:
        return a
    if type(a) is float:
        # Triton passes every Python float as fp32 and does not specialize on its value.
        return float
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() & 15)
    if isinstance(a, int):
        return (a == 1, a & 15, _I32_MIN <= a <= _I32_MAX, a > _I64_MAX)
    raise _Unkeyable(type(a).__name__)


def _make_key_fn(params: Sequence[Any]):
    """Generates ``key(args) -> tuple`` unrolled over the kernel's parameters (no per-arg loop)."""
    names = [f"a{i}" for i in range(len(params))]
    parts = []
    for name, p in zip(names, params, strict=True):
        if p.is_constexpr:
            parts.append(name)
        else:
            parts.append(
                f"(({name}.dtype, {name}.data_ptr() & 15) if type({name}) is _T else "
                f"(({name} == 1, {name} & 15, {_I32_MIN} <= {name} <= {_I32_MAX}, {name} > {_I64_MAX}) "
                f"if type({name}) is int else _other({name})))"
            )
    unpack = ", ".join(names) + ("," if len(names) == 1 else "")
    src = f"def key(args):\n    {unpack} = args\n    return ({', '.join(parts)},)\n"
    namespace: dict[str, Any] = {"_T": torch.Tensor, "_other": _other_key}
    exec(src, namespace)
    return namespace["key"]


class _Entry:
    __slots__ = ("function", "packed_metadata", "run")

    def __init__(self, compiled: Any):
        self.run = compiled.run  # property: initialises the module handle on first access
        self.function = compiled.function
        self.packed_metadata = compiled.packed_metadata


def _hooks_idle() -> bool:
    rt = triton.knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        # Triton >= 3.6 holds a HookChain (never None); older ones a callable or None.
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


class CachedKernel:
    """A ``@triton.jit`` function with a per-specialization launch cache.

    Parameters
    ----------
    fn:
        The ``@triton.jit`` function (a ``JITFunction``; under ``TRITON_INTERPRET=1`` an
        ``InterpretedFunction``, which is always launched the normal way).

    Launch with ``kernel.launch(grid, args, num_warps=..., num_stages=...)`` where ``args`` holds
    every parameter of the kernel in order, constexprs included.
    """

    def __init__(self, fn: Any):
        self.fn = fn
        self._params = list(getattr(fn, "params", ()))
        self._key = _make_key_fn(self._params) if self._params else None
        self._cache: dict[tuple, _Entry] = {}
        self.supported = (
            _VERIFIED_TRITON
            and not _INTERPRET
            and self._key is not None
            and hasattr(fn, "run")
            and not getattr(fn, "pre_run_hooks", None)
        )
        self.hits = 0
        self.misses = 0
        _instances.add(self)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__name__", None) or getattr(getattr(self.fn, "fn", None), "__name__", "?")
        return f"CachedKernel({name}, entries={len(self._cache)})"

    def key(self, args: tuple, num_warps: int | None = None, num_stages: int | None = None) -> tuple:
        """The cache key for these arguments (raises ``_Unkeyable`` when there is none)."""
        try:
            spec = self._key(args)  # type: ignore[misc]
        except (ValueError, TypeError) as err:  # wrong arity, unsupported operand
            raise _Unkeyable(str(err)) from err
        return (spec, num_warps, num_stages, torch.cuda.current_device())

    def clear(self) -> None:
        self._cache.clear()

    def launch(
        self,
        grid: tuple[int, ...],
        args: tuple,
        *,
        num_warps: int | None = None,
        num_stages: int | None = None,
    ) -> None:
        """Launches ``fn[grid](*args, num_warps=..., num_stages=...)``, skipping binding on a hit."""
        if not (_enabled and self.supported):
            self._plain(grid, args, num_warps, num_stages)
            return
        try:
            key = self.key(args, num_warps, num_stages)
            entry = self._cache.get(key)
        except (_Unkeyable, TypeError):  # TypeError: an unhashable constexpr
            self._plain(grid, args, num_warps, num_stages)
            return
        if entry is None or not _hooks_idle():
            self.misses += 1
            compiled = self._plain(grid, args, num_warps, num_stages)
            if entry is None and compiled is not None and hasattr(compiled, "packed_metadata"):
                self._cache[key] = _Entry(compiled)
            return
        self.hits += 1
        n = len(grid)
        entry.run(
            grid[0],
            grid[1] if n > 1 else 1,
            grid[2] if n > 2 else 1,
            _current_stream(key[3]),
            entry.function,
            entry.packed_metadata,
            None,  # launch_metadata: only read by launch hooks, which are idle here
            None,
            None,
            *args,
        )

    def _plain(self, grid, args, num_warps, num_stages):
        opts = {}
        if num_warps is not None:
            opts["num_warps"] = num_warps
        if num_stages is not None:
            opts["num_stages"] = num_stages
        if _INTERPRET or not hasattr(self.fn, "run"):
            return self.fn[grid](*args, **opts)
        compiled = self.fn.run(*args, grid=grid, warmup=False, **opts)
        return compiled.result() if hasattr(compiled, "result") else compiled


def _current_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


def cached_kernel(fn: Any) -> CachedKernel:
    """Wraps a ``@triton.jit`` function in a :class:`CachedKernel`."""
    return CachedKernel(fn)


def clear_launch_caches() -> None:
    """Forgets every cached specialization (after changing Triton knobs that affect compilation)."""
    for k in list(_instances):
        k.clear()


def set_launch_cache_enabled(enabled: bool) -> None:
    """Turns the cached path on or off for every kernel (off: every launch binds as Triton does)."""
    global _enabled
    _enabled = bool(enabled)


def launch_cache_enabled() -> bool:
    return _enabled
