"""Launch-overhead cache for Triton kernels.

A plain ``kernel[grid](*args)`` spends most of its host time binding arguments: building the
specialization of every argument, hashing it with the options into Triton's cache key, and reading
knobs. For the small metadata kernels that run every step this binding costs far more than the
kernel. :class:`CachedKernel` does the binding once per specialization: the first launch goes
through Triton's normal path, the compiled kernel it returns is remembered under a key of our own,
and later launches with the same key call the compiled kernel's launcher directly, with tensors
passed as device addresses (so the launcher does not query the driver for each pointer).

The key is at least as fine as Triton's specialization, so a hit always selects the binary Triton
would have selected:

- tensors: dtype and ``data_ptr() % 16`` (Triton specializes on 16-byte alignment). Pinned host
  tensors count as device tensors: with unified addressing (every 64-bit CUDA platform) their host
  address is their device address, which Triton's launcher also finds for them;
- ints: ``== 1``, ``% 16``, and the 32/64-bit range (i32 / i64 / u64);
- bools and ``None`` by value; floats by type (Triton passes them as fp32, never specialized);
- constexpr parameters by value;
- ``num_warps``, ``num_stages`` and the current CUDA device.

Anything the key cannot describe (other objects, a host tensor that is not pinned, unhashable
constexprs, a registered launch hook, a pre-run hook, the Triton interpreter, a Triton version
outside 3.6-3.9) takes Triton's normal launch path: a cache miss is never a wrong result, only a
slower launch. The launcher's C entry point is called directly only for launcher sources verified
here (by hash); any other launcher is called through its Python wrapper.

Global Triton knobs that change compilation (``TRITON_DEBUG`` and the like) are read by Triton at
each normal launch but not by the cached path; call :func:`clear_launch_caches` after changing them.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import triton

__all__ = [
    "BoundLaunch",
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


def _other(a: Any) -> tuple[Any, Any]:
    """(launch value, key) for anything but a plain tensor or int: the slow branch of ``prep``."""
    if a is None or type(a) is bool:
        return a, a
    if type(a) is float:
        # Triton passes every Python float as fp32 and does not specialize on its value.
        return a, float
    if isinstance(a, torch.Tensor):
        if not a.is_cuda and not a.is_pinned():
            raise _Unkeyable("a tensor neither on a CUDA device nor in pinned host memory")
        ptr = a.data_ptr()
        return ptr, (a.dtype, ptr & 15 == 0)
    if isinstance(a, int):
        a = int(a)
        return a, (a == 1, a & 15 == 0, _I32_MIN <= a <= _I32_MAX, a > _I64_MAX)
    raise _Unkeyable(type(a).__name__)


def _make_prep_fn(params: Sequence[Any]):
    """Generates ``prep(args) -> (key, launch_args)``, unrolled over the kernel's parameters.

    ``key`` is the specialization key described in the module docstring. ``launch_args`` are the
    arguments for the compiled launcher, with each tensor replaced by its device address: the
    launcher then skips calling ``data_ptr()`` and querying the driver for every pointer.
    """
    names = [f"a{i}" for i in range(len(params))]
    body = [f"    {', '.join(names)}{',' if len(names) == 1 else ''} = args"]
    for i, (a, p) in enumerate(zip(names, params, strict=True)):
        if p.is_constexpr:
            body.append(f"    k{i} = p{i} = {a}")
            continue
        body += [
            f"    if type({a}) is _T:",
            f"        if not {a}.is_cuda and not {a}.is_pinned():",
            "            raise _Unkeyable('a tensor neither on a CUDA device nor in pinned host memory')",
            f"        p{i} = {a}.data_ptr()",
            f"        k{i} = ({a}.dtype, p{i} & 15 == 0)",
            f"    elif type({a}) is int:",
            f"        p{i} = {a}",
            f"        k{i} = ({a} == 1, {a} & 15 == 0, {_I32_MIN} <= {a} <= {_I32_MAX}, {a} > {_I64_MAX})",
            "    else:",
            f"        p{i}, k{i} = _other({a})",
        ]
    n = len(params)
    body.append(f"    return ({''.join(f'k{i}, ' for i in range(n))}), ({''.join(f'p{i}, ' for i in range(n))})")
    src = "def prep(args):\n" + "\n".join(body) + "\n"
    namespace: dict[str, Any] = {"_T": torch.Tensor, "_other": _other, "_Unkeyable": _Unkeyable}
    exec(src, namespace)
    return namespace["prep"]


# sha256 (first 16 hex digits) of ``inspect.getsource(CudaLauncher.__call__)`` in the Triton releases
# whose launcher was read and verified, and how its C ``launch`` function takes its arguments.
_VERIFIED_LAUNCHERS = {
    "9412a64d532d5b5c": "3.6",  # 3.6.0
    "152cac5293645963": "3.7",  # 3.7.0, 3.7.1
    "6afde16b206e5650": "3.7",  # 3.8.0 (same call; adds GSan, off unless instrumented)
    "7858736667eaebc1": "3.7",  # 3.9.0 (likewise)
}
_launcher_forms: dict[type, str | None] = {}


def _launcher_form(launcher: Any) -> str | None:
    """Which direct-call form ``launcher.launch`` takes, or None to go through ``launcher(...)``."""
    cls = type(launcher)
    if cls not in _launcher_forms:
        try:
            src = inspect.getsource(cls.__call__)
            form = _VERIFIED_LAUNCHERS.get(hashlib.sha256(src.encode()).hexdigest()[:16])
        except (OSError, TypeError):
            form = None
        _launcher_forms[cls] = form
    form = _launcher_forms[cls]
    # The direct call skips the wrapper's scratch allocation and instrumentation: only valid when
    # the kernel needs neither.
    if (
        form is None
        or getattr(launcher, "global_scratch_size", 1) != 0
        or getattr(launcher, "profile_scratch_size", 1) != 0
        or getattr(launcher, "gsan_enabled", False)
        or not inspect.isbuiltin(getattr(launcher, "launch", None))
    ):
        return None
    return form


class _Entry:
    """A compiled kernel, resolved down to the call that launches it."""

    __slots__ = ("call",)

    def __init__(self, compiled: Any):
        launcher = compiled.run  # property: loads the module on first access
        function = compiled.function
        meta = compiled.packed_metadata
        form = _launcher_form(launcher)
        if form == "3.6":
            c_launch, coop, pdl = launcher.launch, launcher.launch_cooperative_grid, launcher.launch_pdl

            def call(g0, g1, g2, stream, args):
                c_launch(g0, g1, g2, stream, function, coop, pdl, None, None, meta, None, None, None, *args)

        elif form == "3.7":
            c_launch, coop, pdl = launcher.launch, launcher.launch_cooperative_grid, launcher.launch_pdl
            annotations, signature = launcher.arg_annotations, launcher.kernel_signature

            def call(g0, g1, g2, stream, args):
                c_launch(
                    g0,
                    g1,
                    g2,
                    stream,
                    function,
                    coop,
                    pdl,
                    meta,
                    None,
                    None,
                    None,
                    None,
                    None,
                    annotations,
                    signature,
                    args,
                )

        else:

            def call(g0, g1, g2, stream, args):
                launcher(g0, g1, g2, stream, function, meta, None, None, None, *args)

        self.call = call


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
        params = list(getattr(fn, "params", ()))
        self._prep = _make_prep_fn(params) if params else None
        self._cache: dict[tuple, _Entry] = {}
        self.generation = 0  # bumped by clear(): bound launches re-resolve their entry
        self.supported = (
            _VERIFIED_TRITON
            and not _INTERPRET
            and self._prep is not None
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
        return self._key_and_args(args, num_warps, num_stages)[0]

    def _key_and_args(self, args, num_warps, num_stages):
        try:
            spec, launch_args = self._prep(args)  # type: ignore[misc]
        except (ValueError, TypeError) as err:  # wrong arity, unsupported operand
            raise _Unkeyable(str(err)) from err
        return (spec, num_warps, num_stages, _get_device()), launch_args

    def clear(self) -> None:
        self._cache.clear()
        self.generation += 1

    def bind(self, args: tuple, *, num_warps: int | None = None, num_stages: int | None = None) -> BoundLaunch:
        """These arguments, fixed: the returned :class:`BoundLaunch` launches on any grid with no
        per-launch binding or key (for persistent buffers whose addresses never change)."""
        return BoundLaunch(self, args, num_warps, num_stages)

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
        # The hit path is written out flat: every call and attribute lookup here is paid per launch.
        try:
            spec, launch_args = self._prep(args)
            device = _get_device()
            entry = self._cache.get((spec, num_warps, num_stages, device))
        except (_Unkeyable, ValueError, TypeError):  # unkeyable, wrong arity, unhashable constexpr
            self._plain(grid, args, num_warps, num_stages)
            return
        rt = _RUNTIME_KNOBS
        enter, exit_ = rt.launch_enter_hook, rt.launch_exit_hook
        if (
            entry is None
            or (enter is not None and getattr(enter, "calls", True))
            or (exit_ is not None and getattr(exit_, "calls", True))
        ):
            # A miss, or a launch hook (a profiler) that must see launch metadata: bind normally.
            self.misses += 1
            compiled = self._plain(grid, args, num_warps, num_stages)
            if entry is None and compiled is not None and hasattr(compiled, "packed_metadata"):
                self._cache[(spec, num_warps, num_stages, device)] = _Entry(compiled)
            return
        self.hits += 1
        n = len(grid)
        entry.call(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, _get_stream(device), launch_args)

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


class BoundLaunch:
    """A :class:`CachedKernel` with every argument fixed; ``bound(grid)`` launches it.

    The key and the launcher's arguments are computed once, when bound. Values that change from one
    launch to the next must therefore live in device memory the kernel reads (and the grid). The
    first launch, a launch on another device, with a launch hook set, or after
    :func:`clear_launch_caches` goes through :meth:`CachedKernel.launch`; later ones call the
    compiled launcher directly.
    """

    __slots__ = ("_args", "_entry", "_generation", "_kernel", "_key", "_launch_args", "_num_stages", "_num_warps")

    def __init__(self, kernel: CachedKernel, args: tuple, num_warps: int | None, num_stages: int | None):
        self._kernel = kernel
        self._args = tuple(args)
        self._num_warps = num_warps
        self._num_stages = num_stages
        self._entry: _Entry | None = None
        self._generation = -1
        self._key: tuple | None = None
        self._launch_args: tuple = ()
        if kernel.supported:
            try:
                self._key, self._launch_args = kernel._key_and_args(self._args, num_warps, num_stages)
            except _Unkeyable:
                self._key = None

    def __call__(self, grid: tuple[int, ...]) -> None:
        entry, key, kernel = self._entry, self._key, self._kernel
        rt = _RUNTIME_KNOBS
        enter, exit_ = rt.launch_enter_hook, rt.launch_exit_hook
        if (
            entry is None
            or not _enabled
            or self._generation != kernel.generation
            or _get_device() != key[3]  # type: ignore[index]
            or (enter is not None and getattr(enter, "calls", True))
            or (exit_ is not None and getattr(exit_, "calls", True))
        ):
            kernel.launch(grid, self._args, num_warps=self._num_warps, num_stages=self._num_stages)
            if key is not None and _enabled and _get_device() == key[3]:
                self._entry = kernel._cache.get(key)
                self._generation = kernel.generation
            return
        kernel.hits += 1
        n = len(grid)
        entry.call(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, _get_stream(key[3]), self._launch_args)  # type: ignore[index]


# Resolved once, so the hit path does no module attribute lookups. Triton replaces hooks on this
# object (``knobs.runtime.launch_enter_hook = ...`` or ``.add()``), never the object itself.
_RUNTIME_KNOBS = triton.knobs.runtime
# Current CUDA device index, and its current stream's handle (what Triton's driver reads too).
_get_device = getattr(torch._C, "_cuda_getDevice", None)
_get_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


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
