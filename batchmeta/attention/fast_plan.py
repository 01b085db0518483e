"""What the fast planners share: whether they may try their fast path, the planning-call conventions
of the installed FlashInfer, and the one-time check that a wrapper's fast plan equals its stock plan.

The fast planners (:class:`~batchmeta.attention.decode_planner.DecodePlanner`,
:class:`~batchmeta.attention.prefill_planner.PrefillPlanner`,
:class:`~batchmeta.attention.mla.MLAPlanner`) call a wrapper's cached planning module directly,
as FlashInfer's ``plan()`` does after its checks and copies. That call's arguments differ between
releases, so each planner checks its own wrapper once (:func:`verify_fast_plan`): after the stock
first plan it plans the same batch the fast way, then the stock way again, and compares what the
kernels read (the plan info and the int workspace bytes FlashInfer's planner wrote). Only a wrapper
whose fast plan was equal takes the fast path; any other keeps the stock ``plan()`` and one warning
on the ``batchmeta`` logger names the FlashInfer version and the wrapper class.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import torch

from batchmeta.attention.wrappers import flashinfer_available

__all__ = [
    "PlanConventions",
    "PlanState",
    "bind_device_arrays",
    "fast_plan_conventions",
    "fast_plan_supported",
    "path_reproduced",
    "plan_state",
    "verify_fast_plan",
]

logger = logging.getLogger("batchmeta")


@dataclasses.dataclass(frozen=True)
class PlanConventions:
    """How one FlashInfer release's ``plan()`` calls the FA2 planning function, where releases differ.

    Attributes
    ----------
    release:
        The release whose ``plan()`` was read (decode.py, prefill.py, mla/).
    fixed_uniform_q_len:
        Whether FA2's planner takes a 21st argument, ``fixed_uniform_q_len`` (0.7.4): ``True`` from
        the tensor-core decode wrapper, ``False`` from the prefill wrappers.
    decode_uniform_q_len:
        The ``uniform_q_len`` the tensor-core decode wrapper passes for single-token rows: 0 in
        0.7.2.post1 (``q_len_per_req if q_len_per_req > 1 else 0``), 1 in 0.7.4 (``q_len_per_req``).
    """

    release: str
    fixed_uniform_q_len: bool
    decode_uniform_q_len: int

    def fa2_tail(self, uniform_q_len: int, fixed_uniform_q_len: bool) -> tuple:
        """FA2's arguments after ``window_left``: ``fixed_split_size`` (-1), ``disable_split_kv``,
        ``num_colocated_ctas`` (0), ``uniform_q_len`` and, where taken, ``fixed_uniform_q_len``."""
        tail = (-1, False, 0, uniform_q_len)
        return (*tail, fixed_uniform_q_len) if self.fixed_uniform_q_len else tail

    def decode_fa2_tail(self) -> tuple:
        """FA2's trailing arguments from the tensor-core decode wrapper (single-token rows)."""
        return self.fa2_tail(self.decode_uniform_q_len, True)

    def prefill_fa2_tail(self, uniform_q_len: int) -> tuple:
        """FA2's trailing arguments from the paged and ragged prefill wrappers."""
        return self.fa2_tail(uniform_q_len, False)


# Newest first: a release uses the conventions of the newest one here not newer than it. Releases
# between or after these were not read; the check of each wrapper decides whether they match.
_CONVENTIONS = (
    ((0, 7, 4), PlanConventions("0.7.4", fixed_uniform_q_len=True, decode_uniform_q_len=1)),
    ((0, 7, 2), PlanConventions("0.7.2.post1", fixed_uniform_q_len=False, decode_uniform_q_len=0)),
)


def _release(version: str) -> tuple[int, int, int] | None:
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return None if match is None else (int(match[1]), int(match[2]), int(match[3]))


def flashinfer_version() -> str:
    """The installed FlashInfer's ``__version__`` ("unknown" where it has none)."""
    import flashinfer

    return str(getattr(flashinfer, "__version__", "unknown"))


@functools.cache
def fast_plan_conventions() -> PlanConventions | None:
    """The installed FlashInfer's planning-call conventions, or None where no fast plan is tried:
    ``BATCHMETA_FAST_PLAN=0``, FlashInfer unusable here, or a release older than 0.7.2 (one
    warning)."""
    if os.environ.get("BATCHMETA_FAST_PLAN", "1") == "0" or not flashinfer_available():
        return None
    version = flashinfer_version()
    release = _release(version)
    for first, conventions in _CONVENTIONS:
        if release is not None and release >= first:
            return conventions
    logger.warning(
        "FlashInfer %s: batchmeta's fast planners support 0.7.2.post1 to 0.7.4; every plan is FlashInfer's "
        "stock plan()",
        version,
    )
    return None


def fast_plan_supported() -> bool:
    """Whether the fast planners may try their fast path here: FlashInfer usable, a release whose
    planning calls are known (0.7.2.post1 or newer), and ``BATCHMETA_FAST_PLAN`` not set to ``0``.
    Each planner then takes it only if its wrapper's fast plan equals the stock plan
    (:func:`verify_fast_plan`); its ``fast`` attribute says whether it did."""
    return fast_plan_conventions() is not None


@dataclasses.dataclass(frozen=True)
class PlanState:
    """What a plan left for the kernels, as compared by :func:`verify_fast_plan`.

    Attributes
    ----------
    plan_info:
        The planning function's result (``_plan_info``) as a tuple of ints (offsets into the int
        workspace, tile sizes, split flags, padded batch size).
    int_workspace:
        The pinned host int workspace the planner wrote and copied to the device int workspace:
        for the FA2/FA3 and decode planners all of it (bytes past what a plan wrote are the same
        for both plans compared), for MLA the staged bytes it reports.
    scalars:
        The wrapper attributes the fast path sets and ``run()`` reads, name and value.
    """

    plan_info: tuple
    int_workspace: torch.Tensor
    scalars: tuple[tuple[str, Any], ...]

    def differs_from(self, other: PlanState) -> str | None:
        """None when equal, else what differs first."""
        if self.plan_info != other.plan_info:
            return f"plan info {list(self.plan_info)} != {list(other.plan_info)}"
        if self.int_workspace.shape != other.int_workspace.shape or not torch.equal(
            self.int_workspace, other.int_workspace
        ):
            return "int workspace bytes"
        for (name, mine), (_, theirs) in zip(self.scalars, other.scalars, strict=True):
            if mine != theirs:
                return f"{name} {mine!r} != {theirs!r}"
        return None


def plan_state(holder: Any, scalars: tuple[str, ...], workspace_bytes: int | None = None) -> PlanState:
    """The :class:`PlanState` of ``holder`` (a wrapper, or an MLA backend): its ``_plan_info``, its
    pinned int workspace (the first ``workspace_bytes``, or all of it) and the named attributes."""
    pinned = holder._pin_memory_int_workspace_buffer
    if workspace_bytes is not None:
        pinned = pinned[:workspace_bytes]
    return PlanState(
        plan_info=tuple(int(v) for v in holder._plan_info),
        int_workspace=pinned,
        scalars=tuple((name, getattr(holder, name)) for name in scalars),
    )


_warned: set[str] = set()


def _warn_once(wrapper: Any, reason: str) -> None:
    name = type(wrapper).__name__
    if name in _warned:
        return
    _warned.add(name)
    logger.warning(
        "FlashInfer %s, %s: the fast plan %s; this wrapper keeps FlashInfer's stock plan()",
        flashinfer_version(),
        name,
        reason,
    )


def path_reproduced(wrapper: Any, check: Callable[[], bool]) -> bool:
    """``check()``: whether the stock plan left ``wrapper`` on a path a fast planner reproduces. A
    wrapper lacking an attribute or module the check reads (a FlashInfer whose wrapper changed) warns once per
    wrapper class, as a fast plan that differs does, and counts as not reproduced."""
    try:
        return check()
    except (AttributeError, ImportError) as exc:
        _warn_once(wrapper, f"cannot be checked ({exc})")
        return False


def bind_device_arrays(
    wrapper: Any, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor
) -> None:
    """Points an eager paged decode or prefill wrapper at the step's device arrays ``kv_indptr``
    ``[B + 1]``, ``kv_indices``, ``kv_last_page_len`` ``[B]``: what its kernels read.

    The fast plans do it every step. After a stock ``plan()``, which copies the pinned host arrays
    to buffers of its own, it matters for rows whose cache lengths are on the device (speculative
    acceptance): there the host arrays are upper bounds, and the kernels must read the step
    kernel's exact arrays.
    """
    wrapper._paged_kv_indptr_buf = kv_indptr
    wrapper._paged_kv_indices_buf = kv_indices
    wrapper._paged_kv_last_page_len_buf = kv_last_page_len


def verify_fast_plan(
    wrapper: Any,
    fast_plan: Callable[[], None],
    stock_plan: Callable[[], None],
    state: Callable[[], PlanState],
    *,
    written_only: bool = False,
) -> bool:
    """Whether ``wrapper``'s fast plan equals its stock plan on the batch its stock plan just planned.

    Runs ``fast_plan`` (that batch, the fast way), takes its :class:`PlanState` (the int workspace
    copied), runs ``stock_plan`` (the same batch again), and compares the stock plan's state. The
    stock plan runs last whatever happens, so the wrapper is left as the stock plan leaves it. When
    the states differ or the fast plan (or reading its state) raises, it warns once per wrapper
    class on the ``batchmeta`` logger and returns False. Runs once per planner: never per step.

    ``written_only`` is for planners whose stock plan stages into a new, uninitialised pinned
    buffer and leaves parts of the staged range unwritten (FlashInfer 0.7.4's MLA backend: each
    array is sized for the most work items, filled for the planned ones). Then the stock plan's
    state (just planned) is taken first, the fast plan runs twice into that same buffer, first
    filled with 0x00 and then with 0xFF, and the bytes both runs wrote (equal in both) must equal
    the stock plan's; a fast plan that wrote none differs. Bytes neither wrote are never read by
    the kernels, which read as far as the plan's own counts say.
    """
    if written_only:
        return _verify_written(wrapper, fast_plan, stock_plan, state)
    try:
        fast_plan()
        fast = state()
        fast = dataclasses.replace(fast, int_workspace=fast.int_workspace.clone())
    except Exception as exc:  # a wrong argument count or type, a missing attribute
        stock_plan()
        _warn_once(wrapper, f"raised {type(exc).__name__}: {exc}")
        return False
    stock_plan()
    try:
        difference = fast.differs_from(state())
    except Exception as exc:
        difference = f"left no comparable state ({type(exc).__name__}: {exc})"
    if difference is None:
        return True
    _warn_once(wrapper, f"differs from the stock plan ({difference})")
    return False


def _cloned(state: PlanState) -> PlanState:
    return dataclasses.replace(state, int_workspace=state.int_workspace.clone())


def _verify_written(
    wrapper: Any, fast_plan: Callable[[], None], stock_plan: Callable[[], None], state: Callable[[], PlanState]
) -> bool:
    """:func:`verify_fast_plan` with ``written_only``."""
    difference = None
    try:
        stock = _cloned(state())
        runs = []
        for fill in (0x00, 0xFF):
            staged = state().int_workspace  # a view of the pinned buffer the stock plan staged into
            if staged.is_pinned() and torch.cuda.is_available():
                # The stock plan's copy to the device may still read it; once per planner.
                torch.cuda.current_stream().synchronize()
            staged.fill_(fill)
            fast_plan()
            runs.append(_cloned(state()))
    except Exception as exc:  # a wrong argument count or type, a missing attribute
        difference = f"raised {type(exc).__name__}: {exc}"
    stock_plan()
    if difference is None:
        low, high = runs
        difference = low.differs_from(dataclasses.replace(stock, int_workspace=low.int_workspace))
        if difference is None and low.int_workspace.shape != stock.int_workspace.shape:
            difference = "staged int workspace size"
        if difference is None:
            written = low.int_workspace == high.int_workspace
            if not bool(written.any()):
                difference = "wrote no int workspace byte"
            elif not torch.equal(low.int_workspace[written], stock.int_workspace[written]):
                difference = "int workspace bytes"
    if difference is None:
        return True
    reason = difference if difference.startswith("raised") else f"differs from the stock plan ({difference})"
    _warn_once(wrapper, reason)
    return False
