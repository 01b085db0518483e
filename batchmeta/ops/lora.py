"""Multi-LoRA: the per-step adapter segments, and a segmented LoRA matmul that reads them.

A step's LoRA metadata is computed on the host, where each row's adapter and query length are
already known (:mod:`batchmeta.lora` stages them, sorted by adapter, into the step's pinned staging
buffer), and expanded to tokens on the device: in a ``BatchMetadata`` step by the step kernel's own
launch (:mod:`batchmeta.ops.step` runs :func:`lora_row_program` in each row's program and
:func:`lora_tail_program` in its tail program), or alone by :func:`fill_lora_metadata` (the same
programs, one small launch). Both read the staging in place. The outputs, in one int32 device buffer
whose addresses never change (so CUDA graphs read them):

- ``token_lora`` ``[token_capacity]``: the adapter of each token (BGMV / per-token form); -1 for a
  token without one, and for every token past the step's;
- ``token_perm`` ``[token_capacity]``: the token at each position of the order sorted by adapter
  (stable: a row's tokens, and rows of one adapter, keep their order); ``token_perm_inv``
  ``[token_capacity]``: the sorted position of each token; both the identity past the step's tokens;
- ``row_lora`` ``[max_rows]``: the adapter of each batch row (-1: none, padding rows, past the batch);
- the segment block, copied as staged: ``seg_indptr`` ``[S + 1]``, ``seg_lora`` ``[S]``,
  ``seg_rank`` ``[S]``, ``seg_len`` ``[S]`` and ``adapter_rank`` ``[L]`` (``L`` = ``max_loras``,
  ``S = L + 1``): the active adapters' segments first, ascending by adapter id, then one segment
  of the tokens without an adapter (id -1), then empty segments (id -1) up to ``S``.

:func:`lora_segmented` (Triton, with its torch twin) applies LoRA per segment (shrink, expand,
scaling) from those arrays, on a grid fixed by the buffer sizes, so it replays inside a CUDA graph
with any mix of adapters; :func:`lora_per_token` is the per-token (BGMV-form) torch reference.
"""

from __future__ import annotations

import attrs
import torch
import triton
import triton.language as tl

from batchmeta.launch import cached_kernel
from batchmeta.ops._common import check_tensor, use_triton

__all__ = [
    "LORA_ROW_STRIDE",
    "LoraLayout",
    "fill_lora_metadata",
    "lora_per_token",
    "lora_segmented",
]

_BLOCK = 256
_NUM_WARPS = 4

# A staged row: start and end of its tokens (qo_indptr[b], qo_indptr[b + 1]), the sorted position of
# its first token, its adapter (-1: none). Row Bp (the tail program's): the step's token count as
# start and end. Four int32 in a row: one 16-byte read from pinned host memory per program.
LORA_ROW_STRIDE = 4
_L_START, _L_END, _L_DST, _L_ADAPTER = (tl.constexpr(f) for f in range(4))


@attrs.frozen(kw_only=True)
class LoraLayout:
    """Element offsets of what :func:`fill_lora_metadata` reads (``staging``) and writes (``out``).

    ``staging`` (int32): ``rows`` ``[max_rows + 1, LORA_ROW_STRIDE]`` (see ``LORA_ROW_STRIDE``) and
    ``segments`` ``[segment_block]``: ``seg_indptr`` ``[S + 1]``, ``seg_lora``, ``seg_rank``,
    ``seg_len`` ``[S]`` each, ``adapter_rank`` ``[L]``, with ``S = max_loras + 1``.

    ``out`` (int32, from 0): ``token_lora``, ``token_perm``, ``token_perm_inv``
    ``[token_capacity]`` each, ``row_lora`` ``[max_rows]``, then the segment block as staged.
    """

    max_loras: int
    max_rows: int
    token_capacity: int
    rows: int
    segments: int

    @staticmethod
    def staging_size(max_rows: int, max_loras: int) -> int:
        """int32 elements of staging the rows and the segment block take."""
        return (max_rows + 1) * LORA_ROW_STRIDE + 5 * max_loras + 5  # the segment block: 4 S + 1 + L

    @property
    def num_segments(self) -> int:
        return self.max_loras + 1

    @property
    def segment_block(self) -> int:
        """``seg_indptr``, ``seg_lora``, ``seg_rank``, ``seg_len``, ``adapter_rank``: ``4 S + 1 + L``."""
        return 4 * self.num_segments + 1 + self.max_loras

    # Offsets of the fields in ``out`` ------------------------------------------------------------
    @property
    def token_lora(self) -> int:
        return 0

    @property
    def token_perm(self) -> int:
        return self.token_capacity

    @property
    def token_perm_inv(self) -> int:
        return 2 * self.token_capacity

    @property
    def row_lora(self) -> int:
        return 3 * self.token_capacity

    @property
    def seg_indptr(self) -> int:
        return 3 * self.token_capacity + self.max_rows

    @property
    def seg_lora(self) -> int:
        return self.seg_indptr + self.num_segments + 1

    @property
    def seg_rank(self) -> int:
        return self.seg_lora + self.num_segments

    @property
    def seg_len(self) -> int:
        return self.seg_rank + self.num_segments

    @property
    def adapter_rank(self) -> int:
        return self.seg_len + self.num_segments

    @property
    def out_size(self) -> int:
        """int32 elements of ``out``."""
        return self.seg_indptr + self.segment_block

    def check(self, staging: torch.Tensor, out: torch.Tensor, num_rows: int) -> None:
        """Raises ``ValueError`` / ``TypeError`` unless ``num_rows`` rows fit the buffers.

        ``staging`` lives on ``out``'s device, or in pinned host memory when that is CUDA.
        """
        check_tensor("staging", staging, dtypes=(torch.int32,), ndim=1, contiguous=True)
        check_tensor("out", out, dtypes=(torch.int32,), ndim=1, contiguous=True)
        device = out.device
        if staging.device != device and not (device.type == "cuda" and staging.is_pinned()):
            raise ValueError(
                f"staging: expected a tensor on {device} or pinned host memory, got one on {staging.device}"
            )
        if not 0 <= num_rows <= self.max_rows:
            raise ValueError(f"num_rows: expected 0..{self.max_rows} (layout.max_rows), got {num_rows}")
        need = max(self.rows + (self.max_rows + 1) * LORA_ROW_STRIDE, self.segments + self.segment_block)
        if staging.numel() < need:
            raise ValueError(f"staging: the layout needs {need} elements, got {staging.numel()}")
        if out.numel() < self.out_size:
            raise ValueError(f"out: the layout needs {self.out_size} elements, got {out.numel()}")


# --------------------------------------------------------------------------------------------------
# The per-step expansion: in the step kernel's own launch (batchmeta.ops.step), or alone
# --------------------------------------------------------------------------------------------------
@triton.jit
def lora_row_program(
    staging_ptr,  # int32: the staged rows at ROWS (pinned host memory on CUDA)
    out_ptr,  # int32: token_lora, token_perm, token_perm_inv [TOKEN_CAP] each, row_lora [MAX_ROWS]
    b,
    ROWS: tl.constexpr,
    TOKEN_CAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Row ``b``'s tokens: their adapter, sorted positions, and the row's adapter."""
    ar = tl.arange(0, 4)
    v = tl.load(staging_ptr + ROWS + b * 4 + ar)  # the row, in one read
    start = tl.sum(tl.where(ar == _L_START, v, 0), axis=0)
    n = tl.sum(tl.where(ar == _L_END, v, 0), axis=0) - start
    dst = tl.sum(tl.where(ar == _L_DST, v, 0), axis=0)
    adapter = tl.sum(tl.where(ar == _L_ADAPTER, v, 0), axis=0)
    perm = out_ptr + TOKEN_CAP
    inv = out_ptr + 2 * TOKEN_CAP
    tl.store(out_ptr + 3 * TOKEN_CAP + b, adapter)
    for off in range(0, n, BLOCK):
        j = off + tl.arange(0, BLOCK)
        t = start + j
        d = dst + j
        m = (j < n) & (t < TOKEN_CAP) & (d < TOKEN_CAP)
        tl.store(out_ptr + t, adapter + j * 0, mask=m)
        tl.store(inv + t, d, mask=m)
        tl.store(perm + d, t, mask=m)


@triton.jit
def lora_tail_program(
    staging_ptr,  # int32: the staged rows at ROWS, the segment block at SEGS (pinned host memory on CUDA)
    out_ptr,  # int32: as lora_row_program's, then the segment block
    num_rows,
    ROWS: tl.constexpr,
    SEGS: tl.constexpr,
    SEG_BLOCK: tl.constexpr,
    TOKEN_CAP: tl.constexpr,
    MAX_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The segment block as staged; every token past the step's without an adapter and sorted to
    itself; every row past the batch without an adapter."""
    ar = tl.arange(0, 4)
    v = tl.load(staging_ptr + ROWS + num_rows * 4 + ar)
    start = tl.sum(tl.where(ar == _L_START, v, 0), axis=0)  # the step's token count
    perm = out_ptr + TOKEN_CAP
    inv = out_ptr + 2 * TOKEN_CAP
    row_lora = out_ptr + 3 * TOKEN_CAP
    for off in range(0, SEG_BLOCK, BLOCK):
        i = off + tl.arange(0, BLOCK)
        m = i < SEG_BLOCK
        tl.store(row_lora + MAX_ROWS + i, tl.load(staging_ptr + SEGS + i, mask=m), mask=m)
    for off in range(start, TOKEN_CAP, BLOCK):
        t = off + tl.arange(0, BLOCK)
        m = t < TOKEN_CAP
        tl.store(out_ptr + t, -1, mask=m)
        tl.store(perm + t, t, mask=m)
        tl.store(inv + t, t, mask=m)
    for off in range(num_rows, MAX_ROWS, BLOCK):
        r = off + tl.arange(0, BLOCK)
        tl.store(row_lora + r, -1, mask=r < MAX_ROWS)


@triton.jit
def _lora_meta_kernel(
    staging_ptr,  # int32: the staged rows at ROWS, the segment block at SEGS (pinned host memory on CUDA)
    out_ptr,  # int32: token_lora, token_perm, token_perm_inv [TOKEN_CAP] each, row_lora [MAX_ROWS], segments
    ROWS: tl.constexpr,
    SEGS: tl.constexpr,
    SEG_BLOCK: tl.constexpr,
    TOKEN_CAP: tl.constexpr,
    MAX_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    num_rows = tl.num_programs(0) - 1
    if b == num_rows:
        lora_tail_program(staging_ptr, out_ptr, num_rows, ROWS, SEGS, SEG_BLOCK, TOKEN_CAP, MAX_ROWS, BLOCK)
    else:
        lora_row_program(staging_ptr, out_ptr, b, ROWS, TOKEN_CAP, BLOCK)


_lora_meta = cached_kernel(_lora_meta_kernel)


def _launch_args(layout: LoraLayout, staging: torch.Tensor, out: torch.Tensor) -> tuple:
    return (
        staging,
        out,
        layout.rows,
        layout.segments,
        layout.segment_block,
        layout.token_capacity,
        layout.max_rows,
        _BLOCK,
    )


def fill_lora_torch(layout: LoraLayout, staging: torch.Tensor, out: torch.Tensor, num_rows: int) -> None:
    """:func:`fill_lora_metadata`'s work in torch, vectorised: the CPU fallback and the oracle (the step
    kernel's torch twin calls it too)."""
    lay, dev = layout, out.device
    staging = staging.to(dev)  # pinned host staging of a CUDA step: the reference path reads a copy
    rows = staging[lay.rows : lay.rows + (num_rows + 1) * LORA_ROW_STRIDE].view(num_rows + 1, LORA_ROW_STRIDE).long()
    start, end, dst, adapter = rows[:num_rows].unbind(1)
    total = int(rows[num_rows, 0])
    cap = lay.token_capacity
    out[lay.seg_indptr : lay.seg_indptr + lay.segment_block] = staging[lay.segments : lay.segments + lay.segment_block]
    row = torch.repeat_interleave(torch.arange(num_rows, device=dev), end - start)
    t = torch.arange(total, device=dev)
    d = dst[row] + t - start[row]
    ids = torch.arange(cap, device=dev, dtype=torch.int32)
    token_lora = torch.full((cap,), -1, dtype=torch.int32, device=dev)
    token_lora[t] = adapter[row].to(torch.int32)
    perm, inv = ids.clone(), ids.clone()
    perm[d] = t.to(torch.int32)
    inv[t] = d.to(torch.int32)
    out[lay.token_lora : lay.token_lora + cap] = token_lora
    out[lay.token_perm : lay.token_perm + cap] = perm
    out[lay.token_perm_inv : lay.token_perm_inv + cap] = inv
    row_lora = out[lay.row_lora : lay.row_lora + lay.max_rows]
    row_lora.fill_(-1)
    row_lora[:num_rows] = adapter.to(torch.int32)


def fill_lora_metadata(
    layout: LoraLayout, staging: torch.Tensor, out: torch.Tensor, num_rows: int, *, backend: str | None = None
) -> None:
    """Expands ``num_rows`` staged rows and the segment block into ``out`` (see the module docstring).

    For row ``b < num_rows`` staged as ``(start, end, dst, adapter)``, token ``t = start + j``
    (``j < end - start``): ``token_lora[t] = adapter``, ``token_perm_inv[t] = dst + j``,
    ``token_perm[dst + j] = t``; ``row_lora[b] = adapter``. Past the staged token count (row
    ``num_rows``'s start): ``token_lora`` -1, ``token_perm`` and ``token_perm_inv`` the identity;
    ``row_lora`` -1 from ``num_rows``. The segment block is copied as staged. One launch of
    ``num_rows + 1`` programs, no sync; on CUDA ``staging`` may be pinned host memory, read in place.

    Parameters
    ----------
    layout:
        Where the fields are (:class:`LoraLayout`).
    staging:
        int32 staging buffer, written by :meth:`batchmeta.lora.LoraAdapters.stage`.
    out:
        ``[layout.out_size]`` int32 output buffer.
    num_rows:
        Rows of the step (padding rows included), ``<= layout.max_rows``.
    backend:
        None, ``"triton"`` or ``"torch"`` (as for every op).
    """
    layout.check(staging, out, num_rows)
    if use_triton(backend, out):
        _lora_meta.launch((num_rows + 1,), _launch_args(layout, staging, out), num_warps=_NUM_WARPS)
        return
    fill_lora_torch(layout, staging, out, num_rows)


def _check_lora_args(out, x, lora_a, lora_b, scalings) -> tuple[int, int, int, int]:
    check_tensor("x", x, dtypes=(torch.float16, torch.bfloat16, torch.float32), ndim=2, contiguous=True)
    device = x.device
    check_tensor("out", out, dtypes=(x.dtype,), ndim=2, device=device, contiguous=True)
    check_tensor("lora_a", lora_a, dtypes=(x.dtype,), ndim=3, device=device, contiguous=True)
    check_tensor("lora_b", lora_b, dtypes=(x.dtype,), ndim=3, device=device, contiguous=True)
    check_tensor("scalings", scalings, dtypes=(torch.float32,), ndim=1, device=device, contiguous=True)
    num_loras, rank, k = lora_a.shape
    n = lora_b.shape[1]
    if x.shape[1] != k:
        raise ValueError(f"x: expected [T, {k}] (lora_a is [L, R, K] = {tuple(lora_a.shape)}), got {tuple(x.shape)}")
    if tuple(lora_b.shape) != (num_loras, n, rank):
        raise ValueError(f"lora_b: expected [L, N, R] = [{num_loras}, N, {rank}], got {tuple(lora_b.shape)}")
    if tuple(out.shape) != (x.shape[0], n):
        raise ValueError(f"out: expected [T, N] = {(x.shape[0], n)}, got {tuple(out.shape)}")
    if scalings.shape[0] != num_loras:
        raise ValueError(f"scalings: expected [L] = [{num_loras}], got {tuple(scalings.shape)}")
    return num_loras, rank, k, n


@triton.jit
def _lora_sgmv_kernel(
    out_ptr,  # [T, N]: accumulated into
    x_ptr,  # [T, K]
    a_ptr,  # [L, R, K]: shrink weights
    b_ptr,  # [L, N, R]: expand weights
    scale_ptr,  # [L] float32
    perm_ptr,  # int32 [>= T]: the token at each sorted position
    indptr_ptr,  # int32 [S + 1]
    seg_lora_ptr,  # int32 [S]: adapter per segment, -1: skip
    seg_rank_ptr,  # int32 [S]
    T: tl.constexpr,
    K: tl.constexpr,
    N: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Program (s, m, nb): the m-th tile of BLOCK_M tokens of segment s, columns nb * BLOCK_N.. of
    # the output. The grid covers every segment with T tokens; programs past a segment's tokens, or
    # of a segment without an adapter, return at once: the grid never depends on the mix.
    s = tl.program_id(0)
    m = tl.program_id(1)
    nb = tl.program_id(2)
    lora = tl.load(seg_lora_ptr + s)
    lo = tl.load(indptr_ptr + s) + m * BLOCK_M
    hi = tl.load(indptr_ptr + s + 1)
    if (lora >= 0) & (lo < hi):
        rank = tl.load(seg_rank_ptr + s)
        scale = tl.load(scale_ptr + lora)
        rows = lo + tl.arange(0, BLOCK_M)
        row_ok = (rows < hi) & (rows < T)
        tok = tl.load(perm_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        lora64 = lora.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = (rr < rank) & (rr < R)
            shrunk = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                k_ok = kk < K
                xs = tl.load(x_ptr + tok[:, None] * K + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                a = tl.load(
                    a_ptr + lora64 * R * K + rr[None, :] * K + kk[:, None],
                    mask=r_ok[None, :] & k_ok[:, None],
                    other=0.0,
                )
                shrunk += tl.dot(xs, a, input_precision="ieee")  # float32: no TF32, the reference's numerics
            # Rounded to the weights' dtype between shrink and expand, as punica's kernels do.
            shrunk = shrunk.to(x_ptr.dtype.element_ty)
            bw = tl.load(
                b_ptr + lora64 * N * R + cols[None, :] * R + rr[:, None],
                mask=r_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc += tl.dot(shrunk, bw, input_precision="ieee")
        ptrs = out_ptr + tok[:, None] * N + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        prev = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (prev + acc * scale).to(out_ptr.dtype.element_ty), mask=mask)


_lora_sgmv = cached_kernel(_lora_sgmv_kernel)


def _lora_segmented_torch(out, x, lora_a, lora_b, scalings, token_perm, seg_indptr, seg_lora, seg_rank) -> None:
    """Per segment: ``out[tokens] += scaling * ((x[tokens] @ A[:r].T) @ B[:, :r].T)``, in float32,
    the shrink rounded to ``x``'s dtype (the kernel's numerics). Reads the segments on the host."""
    bounds = seg_indptr.tolist()
    for s, (lora, rank) in enumerate(zip(seg_lora.tolist(), seg_rank.tolist(), strict=True)):
        lo, hi = bounds[s], min(bounds[s + 1], x.shape[0])
        if lora < 0 or lo >= hi or rank <= 0:
            continue
        tok = token_perm[lo:hi].long()
        shrunk = (x[tok].float() @ lora_a[lora, :rank].float().T).to(x.dtype)
        delta = (shrunk.float() @ lora_b[lora, :, :rank].float().T) * scalings[lora]
        out[tok] = (out[tok].float() + delta).to(out.dtype)


def lora_segmented(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    token_perm: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_lora: torch.Tensor,
    seg_rank: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Segmented LoRA (SGMV form): ``out[t] += scaling[l] * (x[t] @ A[l, :r].T) @ B[l, :, :r].T`` for
    every token ``t`` of a segment of adapter ``l >= 0`` and rank ``r``; tokens of segments with
    adapter -1 are left as they are.

    The grid is ``(S, ceil(T / BLOCK_M), ceil(N / BLOCK_N))``, fixed by the tensors' shapes: the
    launch reads no segment on the host, so it runs inside a CUDA graph whatever the adapter mix.
    Correct, not tuned: the proof that the step's metadata drives a LoRA kernel.

    Parameters
    ----------
    out:
        ``[T, N]`` (``x``'s dtype), accumulated into (the base layer's output).
    x:
        ``[T, K]`` float16, bfloat16 or float32 activations, in token order.
    lora_a, lora_b:
        ``[L, R, K]`` shrink and ``[L, N, R]`` expand weights (``x``'s dtype), ``R`` the largest rank;
        adapter ``l`` of rank ``r`` uses ``lora_a[l, :r]`` and ``lora_b[l, :, :r]``.
    scalings:
        ``[L]`` float32: ``alpha / r`` of each adapter.
    token_perm:
        int32 ``[>= T]``: the token at each sorted position (``step.lora.token_perm``).
    seg_indptr, seg_lora, seg_rank:
        int32 ``[S + 1]``, ``[S]``, ``[S]``: ``step.lora``'s segments (sorted positions).
    backend:
        None, ``"triton"`` or ``"torch"``. The torch twin reads the segments on the host (a sync on CUDA).
    """
    _, rank, k, n = _check_lora_args(out, x, lora_a, lora_b, scalings)
    device = x.device
    check_tensor("token_perm", token_perm, dtypes=(torch.int32,), ndim=1, device=device, min_numel=x.shape[0])
    check_tensor("seg_indptr", seg_indptr, dtypes=(torch.int32,), ndim=1, device=device, contiguous=True)
    num_segments = seg_indptr.numel() - 1
    for name, t in (("seg_lora", seg_lora), ("seg_rank", seg_rank)):
        check_tensor(name, t, dtypes=(torch.int32,), ndim=1, device=device, contiguous=True)
        if t.numel() != num_segments:
            raise ValueError(f"{name}: expected [S] = [{num_segments}] (seg_indptr is [S + 1]), got {tuple(t.shape)}")
    if not use_triton(backend, x):
        _lora_segmented_torch(out, x, lora_a, lora_b, scalings, token_perm, seg_indptr, seg_lora, seg_rank)
        return
    if x.shape[0] == 0 or num_segments == 0 or n == 0:
        return
    block_m, block_n, block_k, block_r = 16, 64, 32, 16
    grid = (num_segments, triton.cdiv(x.shape[0], block_m), triton.cdiv(n, block_n))
    args = (
        out,
        x,
        lora_a,
        lora_b,
        scalings,
        token_perm,
        seg_indptr,
        seg_lora,
        seg_rank,
        x.shape[0],
        k,
        n,
        rank,
        block_m,
        block_n,
        block_k,
        block_r,
    )
    _lora_sgmv.launch(grid, args, num_warps=4)


def lora_per_token(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    token_lora: torch.Tensor,
    adapter_rank: torch.Tensor,
) -> None:
    """Per-token LoRA (BGMV form), in torch: the reference of the per-token metadata.

    ``out[t] += scaling[l] * (x[t] @ A[l, :r].T) @ B[l, :, :r].T`` with ``l = token_lora[t]`` and
    ``r = adapter_rank[l]``; tokens with ``l = -1`` are left as they are. Float32 math, the shrink
    rounded to ``x``'s dtype, like :func:`lora_segmented`.

    Parameters
    ----------
    out, x, lora_a, lora_b, scalings:
        As in :func:`lora_segmented`.
    token_lora:
        int32 ``[>= T]``: the adapter of each token (``step.lora.token_lora``).
    adapter_rank:
        int32 ``[L]``: each adapter's rank (``step.lora.adapter_rank``).
    """
    num_loras, _, _, _ = _check_lora_args(out, x, lora_a, lora_b, scalings)
    device = x.device
    check_tensor("token_lora", token_lora, dtypes=(torch.int32,), ndim=1, device=device, min_numel=x.shape[0])
    check_tensor("adapter_rank", adapter_rank, dtypes=(torch.int32,), ndim=1, device=device)
    if adapter_rank.numel() != num_loras:
        raise ValueError(f"adapter_rank: expected [L] = [{num_loras}], got {tuple(adapter_rank.shape)}")
    ids = token_lora[: x.shape[0]].long()
    for lora in torch.unique(ids).tolist():  # a reference: host loop over the adapters present
        if lora < 0:
            continue
        rank = int(adapter_rank[lora])
        tok = torch.nonzero(ids == lora).flatten()
        shrunk = (x[tok].float() @ lora_a[lora, :rank].float().T).to(x.dtype)
        delta = (shrunk.float() @ lora_b[lora, :, :rank].float().T) * scalings[lora]
        out[tok] = (out[tok].float() + delta).to(out.dtype)
