"""``correct_attn_out``: context-parallel LSE merge.

The reference is computed per (row, head) with Python ``math`` in double precision; results are
compared with tight tolerances (float32) or bfloat16-rounding tolerances. The merge property is
checked end to end: summing every rank's corrected output gives softmax attention over the whole KV.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from batchmeta.ops import correct_attn_out

INF = math.inf
NAN = math.nan
RANKS = [1, 2, 3, 5]
HEAD_DIMS = [1, 16, 130]
# float32: exp/log rounding; float16 / bfloat16: one rounding of the result (under the interpreter the bf16
# cast truncates, still within one ulp); atol covers float16 underflow of tiny weights.
TOL = {
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.float16: dict(rtol=2**-10, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-6),
}


# --------------------------------------------------------------------------------------------------
# Naive reference
# --------------------------------------------------------------------------------------------------
def _clean(v):
    """NaN and +inf lse entries count as -inf (a rank with nothing to attend to)."""
    return -INF if math.isnan(v) or v == INF else v


def naive_merge(lses_bh, rank):
    """Merged lse and this rank's weight for one (row, head), from the N ranks' lses."""
    vals = [_clean(v) for v in lses_bh]
    m = max(vals)
    if m == -INF:
        return -INF, 0.0
    merged = m + math.log(sum(math.exp(v - m) for v in vals))
    return merged, math.exp(vals[rank] - merged)


def naive_correct(out, lses, rank):
    """``(out * weight, merged lse)`` per (row, head) with Python floats; weight 0 gives exactly 0."""
    num_rows, num_heads, _ = out.shape
    lses_l = lses.double().tolist()
    out_l = out.double().tolist()
    res = [[None] * num_heads for _ in range(num_rows)]
    merged = [[None] * num_heads for _ in range(num_rows)]
    for b in range(num_rows):
        for h in range(num_heads):
            merged[b][h], w = naive_merge([lses_l[n][b][h] for n in range(len(lses_l))], rank)
            res[b][h] = [0.0 if w == 0.0 else o * w for o in out_l[b][h]]
    return torch.tensor(res, dtype=torch.float64), torch.tensor(merged, dtype=torch.float64)


def check(out_before, lses, rank, out_after, lse_out):
    expected_out, expected_lse = naive_correct(out_before.cpu(), lses.cpu(), rank)
    torch.testing.assert_close(out_after.cpu().double(), expected_out, **TOL[out_after.dtype])
    torch.testing.assert_close(lse_out.cpu().double(), expected_lse, rtol=1e-5, atol=1e-5)
    # A zero weight gives exactly 0, never NaN, and an all-empty (row, head) gives lse -inf.
    zero = (expected_out == 0).all(-1)
    assert (out_after.cpu()[zero] == 0).all()
    assert not torch.isnan(lse_out).any()


# --------------------------------------------------------------------------------------------------
# Against the reference
# --------------------------------------------------------------------------------------------------
LSE_KINDS = ["finite"] * 5 + ["-inf", "nan", "+inf"]


@given(data=st.data())
def test_correct_attn_out_matches_naive(data, device, backend):
    num_ranks = data.draw(st.sampled_from(RANKS), label="ranks")
    num_rows = data.draw(st.integers(1, 4), label="rows")
    num_heads = data.draw(st.integers(1, 4), label="heads")
    head_dim = data.draw(st.sampled_from(HEAD_DIMS), label="head_dim")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), label="out dtype")
    lse_dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="lses dtype")
    rank = data.draw(st.integers(0, num_ranks - 1), label="rank")
    lses = torch.empty((num_ranks, num_rows, num_heads), dtype=torch.float32)
    for b in range(num_rows):
        for h in range(num_heads):
            pattern = data.draw(st.sampled_from(["mixed", "all empty", "mine empty"]), label="pattern")
            for n in range(num_ranks):
                kind = "-inf" if pattern == "all empty" else data.draw(st.sampled_from(LSE_KINDS))
                if pattern == "mine empty" and n == rank:
                    kind = data.draw(st.sampled_from(["-inf", "nan", "+inf"]))
                value = data.draw(st.floats(-30, 30)) if kind == "finite" else float(kind)
                lses[n, b, h] = value
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    out = torch.randn((num_rows, num_heads, head_dim), generator=gen) * 3
    # This rank's partial output is NaN where its lse says it had nothing to attend to.
    if data.draw(st.booleans(), label="NaN partial output where empty"):
        mine = lses[rank]
        out[torch.isnan(mine) | torch.isinf(mine)] = NAN
    out, lses = out.to(dtype), lses.to(lse_dtype)

    # out may be a view into a wider buffer: the rest of the buffer must stay untouched.
    wider = data.draw(st.booleans(), label="strided out")
    buffer = torch.full((num_rows, num_heads, head_dim + (5 if wider else 0)), 42.0, dtype=dtype, device=device)
    view = buffer[..., :head_dim]
    view.copy_(out.to(device))
    # lse_out: None (allocated), or a view with a row stride past its width; lses: contiguous, or the
    # [N, B, H] view of [B, H, N] storage.
    lse_kind = data.draw(st.sampled_from(["none", "strided"]), label="lse_out")
    lse_buffer = torch.full((num_rows, num_heads + 2), 42.0, device=device)
    lse_out = lse_buffer[:, :num_heads] if lse_kind == "strided" else None
    lses_dev = lses.to(device)
    if data.draw(st.booleans(), label="lses from [B, H, N] storage"):
        lses_dev = lses_dev.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    result, merged = correct_attn_out(view, lses_dev, rank, lse_out=lse_out, backend=backend)
    assert result is view and (lse_out is None or merged is lse_out)
    assert merged.dtype == torch.float32 and merged.shape == (num_rows, num_heads)
    check(out, lses, rank, view, merged)
    assert (buffer[..., head_dim:] == 42.0).all()
    assert (lse_buffer[:, num_heads:] == 42.0).all()


@pytest.mark.parametrize("num_ranks", RANKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_ranks_empty_gives_zero_and_minus_inf(num_ranks, dtype, device, backend):
    # SPEC bug 7: every rank -inf (or NaN / +inf, which count as -inf) -> output exactly 0, lse -inf.
    specials = [-INF, NAN, INF]
    lses = torch.tensor([[[specials[(n + h) % 3] for h in range(3)]] for n in range(num_ranks)], dtype=dtype)
    out = torch.full((1, 3, 130), NAN, dtype=dtype, device=device)
    out[0, 1] = 5.0
    for rank in range(num_ranks):
        o = out.clone()
        _, merged = correct_attn_out(o, lses.to(device), rank, backend=backend)
        assert torch.equal(o, torch.zeros_like(o)), f"rank {rank}: {o}"
        assert merged.tolist() == [[-INF] * 3]


def test_only_this_rank_contributes_weight_one(device, backend):
    # The other ranks are -inf / NaN / +inf: this rank's output passes unchanged and lse is its own.
    lses = torch.tensor([[[-INF, 1.5]], [[2.25, NAN]], [[INF, -INF]]], device=device)  # [3, 1, 2]
    out = torch.randn(1, 2, 130, device=device)
    o = out.clone()
    _, merged = correct_attn_out(o, lses, 1, backend=backend)
    torch.testing.assert_close(o[0, 0], out[0, 0], rtol=1e-6, atol=0)  # rank 1 alone on head 0
    assert torch.equal(o[0, 1], torch.zeros(130, device=device))  # rank 1 empty on head 1
    assert merged.tolist() == [[2.25, 1.5]]


def test_large_lse_values_do_not_overflow(device, backend):
    # exp(1000) overflows any float: the merge must subtract the maximum first. Near 1000 a float32 ulp is
    # 6e-5, hence rtol 1e-4.
    lses = torch.tensor([[[1000.0, -1000.0]], [[1000.0 + math.log(3.0), -1000.0]]], device=device)
    out = torch.ones(1, 2, 16, device=device)
    o0, o1 = out.clone(), out.clone()
    _, m0 = correct_attn_out(o0, lses, 0, backend=backend)
    correct_attn_out(o1, lses, 1, backend=backend)
    torch.testing.assert_close(o0[0, 0], torch.full((16,), 0.25, device=device), rtol=1e-4, atol=0)
    torch.testing.assert_close(o1[0, 0], torch.full((16,), 0.75, device=device), rtol=1e-4, atol=0)
    torch.testing.assert_close(o0[0, 1] + o1[0, 1], torch.ones(16, device=device), rtol=1e-4, atol=0)
    torch.testing.assert_close(
        m0[0].double().cpu(),
        torch.tensor([1000.0 + math.log(4.0), -1000.0 + math.log(2.0)], dtype=torch.float64),
        rtol=1e-6,
        atol=0,
    )


# --------------------------------------------------------------------------------------------------
# The merge property: corrected partial outputs of all ranks sum to attention over the whole KV
# --------------------------------------------------------------------------------------------------
def _attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v and its lse for one (row, head); empty KV -> NaN output, lse -inf,
    which is what a kernel dividing 0 by 0 returns."""
    if k.shape[0] == 0:
        return torch.full_like(q, NAN), torch.tensor(-INF, dtype=q.dtype)
    scores = (k @ q) / math.sqrt(q.shape[0])
    lse = torch.logsumexp(scores, 0)
    return torch.softmax(scores, 0) @ v, lse


@pytest.mark.parametrize("num_ranks", RANKS)
@pytest.mark.parametrize("head_dim", [16, 130])
def test_summed_corrected_outputs_equal_full_attention(num_ranks, head_dim, device, backend):
    gen = torch.Generator().manual_seed(1000 * num_ranks + head_dim)
    num_rows, num_heads = 4, 3
    kv_lens = [9, 1, 0, 13]  # row 2: a padding row with no KV at all
    q = torch.randn(num_rows, num_heads, head_dim, generator=gen)
    partial_out = torch.empty(num_ranks, num_rows, num_heads, head_dim)
    partial_lse = torch.empty(num_ranks, num_rows, num_heads)
    full_out = torch.zeros(num_rows, num_heads, head_dim, dtype=torch.float64)
    full_lse = torch.full((num_rows, num_heads), -INF, dtype=torch.float64)
    for b, kv_len in enumerate(kv_lens):
        k = torch.randn(kv_len, num_heads, head_dim, generator=gen) * 2
        v = torch.randn(kv_len, num_heads, head_dim, generator=gen)
        # Split the KV among the ranks at random cuts; the last rank (when there are several) gets none.
        sharing = num_ranks - 1 if num_ranks > 1 else 1
        cuts = sorted(torch.randint(0, kv_len + 1, (sharing - 1,), generator=gen).tolist())
        bounds = [0, *cuts, kv_len] + [kv_len] * (num_ranks - sharing)
        for h in range(num_heads):
            if kv_len:
                full_out[b, h], full_lse[b, h] = _attention(q[b, h].double(), k[:, h].double(), v[:, h].double())
            for n in range(num_ranks):
                lo, hi = bounds[n], bounds[n + 1]
                partial_out[n, b, h], partial_lse[n, b, h] = _attention(q[b, h], k[lo:hi, h], v[lo:hi, h])

    total = torch.zeros(num_rows, num_heads, head_dim, dtype=torch.float64)
    lses = partial_lse.to(device)
    for n in range(num_ranks):
        o = partial_out[n].to(device)
        _, merged = correct_attn_out(o, lses, n, backend=backend)
        assert not torch.isnan(o).any()
        total += o.cpu().double()
        torch.testing.assert_close(merged.cpu().double(), full_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, full_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(total[2], torch.zeros(num_heads, head_dim, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda d: {"out": torch.ones(2, 3, 4, dtype=torch.int32, device=d)}, TypeError, "out"),
        (lambda d: {"out": torch.ones(2, 3, device=d)}, ValueError, "out"),
        (lambda d: {"lses": torch.zeros(3, 2, 3, dtype=torch.int64, device=d)}, TypeError, "lses"),
        (lambda d: {"lses": torch.zeros(3, 2, 4, device=d)}, ValueError, "lses"),
        (lambda d: {"lses": torch.zeros(3, 6, device=d)}, ValueError, "lses"),
        (lambda d: {"lses": torch.zeros(0, 2, 3, device=d)}, ValueError, "lses"),
        (lambda d: {"rank": 3}, ValueError, "rank"),
        (lambda d: {"rank": -1}, ValueError, "rank"),
        (lambda d: {"rank": 1.0}, TypeError, "rank"),
        (lambda d: {"rank": True}, TypeError, "rank"),
        (lambda d: {"lse_out": torch.full((2, 3), 7.0, dtype=torch.float16, device=d)}, TypeError, "lse_out"),
        (lambda d: {"lse_out": torch.full((3, 2), 7.0, device=d)}, ValueError, "lse_out"),
        (lambda d: {"backend": "cuda"}, ValueError, "backend"),
    ],
)
def test_correct_attn_out_rejects_bad_input_before_writing(change, error, match, device, backend):
    args = dict(
        out=torch.ones(2, 3, 4, device=device),
        lses=torch.zeros(3, 2, 3, device=device),
        rank=1,
        lse_out=torch.full((2, 3), 7.0, device=device),
        backend=backend,
    )
    args.update(change(device))
    before = {k: args[k].clone() for k in ("out", "lse_out")}
    with pytest.raises(error, match=match):
        correct_attn_out(**args)
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{k} was written before the error"


def test_unknown_backend_rejected_on_an_empty_batch_too(device):
    with pytest.raises(ValueError, match="backend"):
        correct_attn_out(torch.zeros(0, 2, 8, device=device), torch.zeros(2, 0, 2, device=device), 0, backend="cuda")
