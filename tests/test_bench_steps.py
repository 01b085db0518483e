"""benchmarks/bench_steps.py without a GPU: the peer-glue baseline builds the same metadata as batchmeta
(else its timings compare unlike work), and the summaries' arithmetic."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchmeta import BatchMetadata, KVGroup, MetadataConfig

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_steps.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_steps", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_steps", mod)
    spec.loader.exec_module(mod)
    return mod


bench = _load()


@settings(max_examples=15, deadline=None)
@given(
    page_size=st.sampled_from([1, 4, 16]),
    rows=st.lists(st.tuples(st.integers(1, 9), st.integers(0, 40)), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_peer_glue_builds_batchmeta_metadata(page_size, rows, seed):
    q = np.array([r[0] for r in rows])
    c = np.array([r[1] for r in rows])
    b = len(rows)
    cfg = MetadataConfig(
        max_num_reqs=8,
        max_num_tokens=64,
        max_model_len=64,
        kv_groups=KVGroup(page_size=page_size),
        num_qo_heads=4,
        num_kv_heads=2,
        head_dim=64,
        device="cpu",
    )
    meta = BatchMetadata(cfg)
    rng = np.random.default_rng(seed)
    slots = rng.permutation(8)[:b]  # rows in any slot order
    pages = rng.permutation(np.arange(1, 200))
    at = 0
    for s, n in zip(slots, -(-(q + c) // page_size), strict=True):
        meta.block_tables.append(int(s), pages[at : at + n].tolist())
        at += n
    step = meta.prepare_prefill(slots, query_lens=q, cache_lens=c)
    glue = bench.PeerGlue(meta.block_tables.tables[0], page_size, 64)
    glue.kv_indices.fill_(-7)  # sentinel: what the gather leaves alone shows
    out = glue.step(slots.astype(np.int32), q, c)
    t, n = int(q.sum()), int(step.kv_indptr_host[0][b])
    assert torch.equal(out["positions"].long(), step.positions[:t])
    assert torch.equal(out["slots"], step.slot_mappings[0][:t])
    assert torch.equal(out["kv_indptr"], step.kv_indptr[0][: b + 1])
    assert torch.equal(out["kv_indices"], step.kv_indices[0][:n])
    assert (glue.kv_indices[n:] == -7).all()
    assert torch.equal(out["last"], step.kv_last_page_len[0][:b])
    assert torch.equal(out["qo"], step.qo_indptr[: b + 1])
    assert out["kv_indptr_host"].tolist() == step.kv_indptr_host[0][: b + 1].tolist()
    assert out["qo_host"].tolist() == step.qo_indptr_host[: b + 1].tolist()
    assert out["last_host"].tolist() == step.kv_last_page_len_host[0][:b].tolist()


def _impl(host, gpu):
    return dict(host_median=host, gpu_median=gpu)


def test_against_peers_takes_the_fastest_peer_for_host_and_peer_glue_for_gpu():
    results = {
        "D1": dict(
            what="",
            impls={
                "stock-plan": _impl(500, 20),
                "batchmeta": _impl(100, 12),
                "fast-decode-plan": _impl(300, 1),
                "peer-glue": _impl(450, 10),
            },
        ),
        "D2": dict(what="", impls={"batchmeta-graph": _impl(60, 30), "peer-glue": _impl(100, 20)}),
        "P1": dict(what="", impls={"batchmeta": _impl(50, 10), "fast-decode-plan": _impl(150, 1)}),
        "S_graph": dict(what="", impls={"batchmeta+fwd": _impl(1, 1)}),  # no peer: no row
    }
    rows = bench.against_peers(results)
    assert set(rows) == {"D1", "D2", "P1"}
    d1 = rows["D1"]
    assert d1["best_peer"] == "fast-decode-plan" and d1["host_ratio"] == pytest.approx(1 / 3)
    assert d1["gpu_ratio"] == pytest.approx(1.2) and d1["passed"] is True  # 1.2 ≤ 1.2
    d2 = rows["D2"]
    assert d2["batchmeta_impl"] == "batchmeta-graph" and d2["host_ratio"] == pytest.approx(0.6)
    assert d2["passed"] is False and "✗" in d2["checks"][0]["text"]
    assert rows["P1"]["passed"] is None and rows["P1"]["gpu_ratio"] is None  # no peer-glue: GPU unchecked
    lines = bench.against_peers_lines(rows)
    assert len(lines) == 2 + 3 and "**miss**" in lines[3]


def test_the_back_to_back_summaries_compare_the_back_to_back_host_figures():
    def impl(host, run, gpu):
        return dict(host_median=host, host_run_median=run, gpu_median=gpu)

    results = {
        "D1": dict(
            what="",
            impls={
                "stock-plan": impl(500, 400, 20),
                "batchmeta": impl(160, 60, 12),
                "batchmeta-noplan": impl(120, 30, 7),
                "fast-decode-plan": impl(300, 200, 1),
                "peer-glue": impl(450, 100, 10),
            },
        )
    }
    rows = bench.against_peers(results, host="host_run_median")["D1"]
    assert rows["best_peer"] == "peer-glue" and rows["host_ratio"] == pytest.approx(0.6)
    assert rows["best_peer_host_us"] == 100 and rows["batchmeta_host_us"] == 60
    assert bench.against_peers(results)["D1"]["best_peer"] == "fast-decode-plan"
    s = bench.summarize(results, host="host_run_median")["D1"]
    assert s["host_ratio"] == pytest.approx(60 / 400) and s["noplan_ratio"] == pytest.approx(30 / 400)
    assert [c["ok"] for c in s["checks"]] == [True, True, True]
    assert bench.summarize(results)["D1"]["passed"] is False


def test_against_world1_pairs_a_rank_with_the_same_batch_on_one_rank():
    results = {
        "D1": dict(what="", impls={"batchmeta": _impl(100, 10)}),  # not context-parallel: no row
        "DCP": dict(
            what="",
            impls={
                "batchmeta-world1": _impl(100, 10),
                "batchmeta": _impl(150, 12),
                "batchmeta-noplan": _impl(60, 9),
                "batchmeta-world1-noplan": _impl(40, 6),
            },
        ),
    }
    rows = bench.against_world1(results)
    assert [(r["scenario"], r["rank"], r["world1"]) for r in rows] == [
        ("DCP", "batchmeta", "batchmeta-world1"),
        ("DCP", "batchmeta-noplan", "batchmeta-world1-noplan"),
    ]
    assert rows[0]["host_ratio"] == pytest.approx(1.5) and rows[0]["gpu_ratio"] == pytest.approx(1.2)
    assert rows[1]["host_ratio"] == pytest.approx(1.5) and rows[1]["gpu_ratio"] == pytest.approx(1.5)
    lines = bench.against_world1_lines(rows)
    assert len(lines) == 2 + 2 and f"1.50{bench.TIMES}" in lines[2]


def test_the_context_parallel_scenario_is_d1s_batch_on_rank_0_of_2():
    scns = {s.name: s for s in bench.scenarios(np.random.default_rng(0))}
    dcp, d1 = scns["DCP"], scns["D1"]
    assert dcp.cp == 2 and dcp.cache_lens == d1.cache_lens and dcp.query_lens == d1.query_lens
    assert all(s.cp == 0 for name, s in scns.items() if name != "DCP")
