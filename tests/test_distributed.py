"""Context-parallel merge over torch.distributed: gloo process groups of 2 and 4 CPU ranks (and NCCL
with FlashInfer on two GPUs), each rank holding a share of every request's KV, against full
attention over the whole KV."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from batchmeta.distributed import cp_lse_ag_out_ar, cp_lse_ag_out_rs

B, H, D = 5, 4, 24
KV_LENS = [1, 2, 3, 9, 0]  # short requests leave some ranks an empty share; the last has no KV at all


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(device):
    gen = torch.Generator().manual_seed(1234)  # the same on every rank
    q = torch.randn(B, H, D, generator=gen)
    kv = [(torch.randn(n, H, D, generator=gen), torch.randn(n, H, D, generator=gen)) for n in KV_LENS]
    return q.to(device), [(k.to(device), v.to(device)) for k, v in kv]


def _share(n: int, rank: int, world: int) -> slice:
    """Contiguous split of n positions over world ranks; late ranks get empty shares when n < world."""
    per = math.ceil(n / world) if n else 0
    return slice(min(rank * per, n), min((rank + 1) * per, n))


def _partial(q, kv, rank, world, empty_lse):
    """This rank's float32 attention and natural-log lse over its share; an empty share gives a
    garbage (NaN) output and ``empty_lse``, as some kernels do."""
    out = torch.empty(B, H, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, dtype=torch.float32, device=q.device)
    for b, (k, v) in enumerate(kv):
        s = _share(k.shape[0], rank, world)
        kk, vv = k[s].float(), v[s].float()
        if kk.shape[0] == 0:
            out[b] = float("nan")
            lse[b] = empty_lse
            continue
        scores = torch.einsum("hd,khd->hk", q[b].float(), kk) / math.sqrt(D)
        lse[b] = torch.logsumexp(scores, -1)
        out[b] = torch.einsum("hk,khd->hd", torch.softmax(scores, -1), vv)
    return out, lse


def _full(q, kv):
    out = torch.zeros(B, H, D, dtype=torch.float32, device=q.device)
    lse = torch.full((B, H), float("-inf"), device=q.device)
    for b, (k, v) in enumerate(kv):
        if k.shape[0] == 0:
            continue
        scores = torch.einsum("hd,khd->hk", q[b].float(), k.float()) / math.sqrt(D)
        lse[b] = torch.logsumexp(scores, -1)
        out[b] = torch.einsum("hk,khd->hd", torch.softmax(scores, -1), v.float())
    return out, lse


def _worker(rank, world, port, backend):
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        q, kv = _data(device)
        ref_out, ref_lse = _full(q, kv)
        hr = H // world
        mine = slice(rank * hr, (rank + 1) * hr)
        for empty_lse in (float("-inf"), float("nan"), float("inf")):
            out, lse = _partial(q, kv, rank, world, empty_lse)
            got, got_lse = cp_lse_ag_out_rs(out.clone(), lse, return_lse=True)
            assert got.shape == (B, hr, D)
            torch.testing.assert_close(got, ref_out[:, mine], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_lse, ref_lse[:, mine], rtol=1e-5, atol=1e-5)
            got, got_lse = cp_lse_ag_out_ar(out.clone(), lse, return_lse=True)
            torch.testing.assert_close(got, ref_out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_lse, ref_lse, rtol=1e-5, atol=1e-5)
            assert not got.isnan().any()
        # Base-2 lses (FlashInfer's default) give the same merge.
        out, lse = _partial(q, kv, rank, world, float("-inf"))
        got = cp_lse_ag_out_ar(out.clone(), lse / math.log(2.0), lse_base="2")
        torch.testing.assert_close(got, ref_out, rtol=1e-5, atol=1e-5)
        # Half-precision outputs.
        got = cp_lse_ag_out_rs(out.clone().nan_to_num(0.0).to(torch.bfloat16), lse)
        torch.testing.assert_close(got.float(), ref_out[:, mine], rtol=2e-2, atol=2e-2)
        if H % world == 0 and world > 1:
            odd = torch.zeros(B, world + 1, D, device=device)
            try:
                cp_lse_ag_out_rs(odd, torch.zeros(B, world + 1, device=device))
            except ValueError as err:
                assert "heads" in str(err)
            else:
                raise AssertionError("uneven heads were accepted")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_merge_equals_full_attention(world):
    mp.spawn(_worker, args=(world, _free_port(), "gloo"), nprocs=world, join=True)


def test_world_of_one_returns_input_unchanged():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        out = torch.randn(B, H, D)
        lse = torch.randn(B, H)
        assert cp_lse_ag_out_rs(out, lse) is out
        got, got_lse = cp_lse_ag_out_ar(out, lse, return_lse=True)
        assert got is out and got_lse is lse
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "out, lse, kwargs, exc, match",
    [
        (torch.zeros(B, H), torch.zeros(B, H), {}, ValueError, "out"),
        (torch.zeros(B, H, D, dtype=torch.int32), torch.zeros(B, H), {}, TypeError, "out"),
        (torch.zeros(B, H, D), torch.zeros(B, H + 1), {}, ValueError, "lse"),
        (torch.zeros(B, H, D), torch.zeros(B, H, dtype=torch.float16), {}, TypeError, "lse"),
        (torch.zeros(B, H, D), torch.zeros(B, H), {"lse_base": "10"}, ValueError, "lse_base"),
        (torch.zeros(B, H, 2 * D)[..., ::2], torch.zeros(B, H), {}, ValueError, "out"),
    ],
)
def test_bad_input_raises_before_any_collective(out, lse, kwargs, exc, match):
    # No process group exists: a check that ran after a collective would fail differently.
    for fn in (cp_lse_ag_out_rs, cp_lse_ag_out_ar):
        with pytest.raises(exc, match=match):
            fn(out, lse, **kwargs)


def _flashinfer_worker(rank, world, port):
    """Each GPU computes attention over its KV share with FlashInfer (lse returned), then merges."""
    import flashinfer

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        device = torch.device("cuda", rank)
        gen = torch.Generator().manual_seed(7)
        hq, hkv, d, n_kv = 8, 2, 64, [33, 200, 1, 64]  # a head size the saved JIT cache holds
        q = torch.randn(len(n_kv), hq, d, generator=gen).to(device, torch.float16)
        kv = [
            (
                torch.randn(n, hkv, d, generator=gen).to(device, torch.float16),
                torch.randn(n, hkv, d, generator=gen).to(device, torch.float16),
            )
            for n in n_kv
        ]
        shares = [_share(n, rank, world) for n in n_kv]
        k = torch.cat([k[s] for (k, _), s in zip(kv, shares, strict=True)])
        v = torch.cat([v[s] for (_, v), s in zip(kv, shares, strict=True)])
        kv_lens = [s.stop - s.start for s in shares]
        qo = torch.arange(len(n_kv) + 1, dtype=torch.int32)
        kvp = torch.tensor([0, *torch.tensor(kv_lens).cumsum(0).tolist()], dtype=torch.int32)
        ws = torch.zeros(128 << 20, dtype=torch.uint8, device=device)
        w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
        w.plan(qo, kvp, hq, hkv, d, causal=False, q_data_type=torch.float16)
        out, lse = w.run(q, k, v, return_lse=True)  # base-2 lse
        merged = cp_lse_ag_out_ar(out, lse.float(), lse_base="2")
        rep = hq // hkv
        for b, (kb, vb) in enumerate(kv):
            s = torch.einsum("hd,khd->hk", q[b].float(), kb.float().repeat_interleave(rep, 1)) / math.sqrt(d)
            ref = torch.einsum("hk,khd->hd", torch.softmax(s, -1), vb.float().repeat_interleave(rep, 1))
            torch.testing.assert_close(merged[b].float(), ref, rtol=1e-2, atol=1e-2)
        part = cp_lse_ag_out_rs(w.run(q, k, v, return_lse=True)[0], lse.float(), lse_base="2")
        torch.testing.assert_close(part, merged[:, rank * hq // world : (rank + 1) * hq // world])
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_nccl_flashinfer_merge_on_two_gpus():
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on the lent machines
    mp.spawn(_flashinfer_worker, args=(2, _free_port()), nprocs=2, join=True)
    mp.spawn(_worker, args=(2, _free_port(), "nccl"), nprocs=2, join=True)
