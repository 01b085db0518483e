"""Host µs and GPU µs per step of multi-LoRA batch metadata: batchmeta's against the ``torch.unique`` /
sort approach engines use today, measured in the same run.

Run on a machine with CUDA:  python benchmarks/bench_lora_meta.py [--batch 256] [--adapters 1 8 64]
CPU smoke run (torch fallbacks, host µs only):  python benchmarks/bench_lora_meta.py --device cpu

A decode batch of ``--batch`` rows, each request slot on one of ``A`` adapters (round robin) for A
in ``--adapters``, with ``max_loras`` = the largest A.

- batchmeta: the LoRA part of a step, as ``BatchMetadata._prepare`` runs it. Host µs: the host
  counting sort into the (pinned) staging buffer (:meth:`~batchmeta.lora.LoraAdapters.stage`,
  compiled host path), the only host work LoRA adds (the step's own launch expands the rows; nothing
  waits for the device). GPU µs: the step's launch with LoRA, and the same launch of a
  ``BatchMetadata`` without LoRA on the same batch, by CUDA events over ``--iters`` launches; their
  difference is LoRA's share.
- baseline (vLLM's ``LoRAKernelMeta.prepare_tensors``, re-implemented): the per-token adapter ids
  copied host→device, ``torch.sort(stable=True)``, ``torch.unique(sorted=True,
  return_counts=True)``, the count of active adapters read on the host (the sync), then the
  padded ``active_lora_ids`` / ``num_tokens_per_lora`` / ``lora_token_start_loc`` copies. Host µs:
  wall time per step (it includes waiting for the device: the sync is the approach's cost). GPU µs:
  CUDA events around the same work.

Also reported: a whole ``prepare_decode`` with LoRA on and off (the same batch), host µs.
``--json PATH`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
import torch
import triton

from batchmeta import BatchMetadata, KVGroup, MetadataConfig


def _meta(device: str, batch: int, max_loras: int, rank: int) -> BatchMetadata:
    cfg = MetadataConfig(
        max_num_reqs=batch,
        max_num_tokens=max(batch, 256),
        max_model_len=4096,
        kv_groups=KVGroup(page_size=16),
        num_qo_heads=32,
        num_kv_heads=8,
        head_dim=128,
        q_dtype=torch.float16 if device == "cuda" else torch.float32,
        kv_dtype=torch.float16 if device == "cuda" else torch.float32,
        device=device,
        plan_attention=False,  # the LoRA metadata alone; attention planning is the same with LoRA off
        max_loras=max_loras,
        max_lora_rank=rank if max_loras else 0,
    )
    meta = BatchMetadata(cfg)
    for r in range(batch):
        meta.block_tables.append(r, list(range(1 + 64 * r, 65 + 64 * r)))
    return meta


class UniqueBaseline:
    """vLLM's ``LoRAKernelMeta`` buffers and ``prepare_tensors``, re-implemented (a sync per step)."""

    def __init__(self, max_loras: int, max_num_tokens: int, device: torch.device):
        self.token_lora_mapping = torch.empty(max_num_tokens, dtype=torch.int32, device=device)
        self.token_indices_sorted_by_lora_ids = torch.empty(max_num_tokens, dtype=torch.int32, device=device)
        self.active_lora_ids = torch.empty(max_loras + 1, dtype=torch.int32, device=device)
        self.num_tokens_per_lora = torch.zeros(max_loras + 1, dtype=torch.int32, device=device)
        self.lora_token_start_loc = torch.zeros(max_loras + 2, dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        self.host = torch.empty(max_num_tokens, dtype=torch.int32, pin_memory=pin)

    def prepare(self, token_lora: np.ndarray) -> None:
        n = token_lora.shape[0]
        self.host[:n].numpy()[:] = token_lora
        self.token_lora_mapping[:n].copy_(self.host[:n], non_blocking=True)
        mapping = self.token_lora_mapping[:n]
        _, order = torch.sort(mapping, stable=True)
        self.token_indices_sorted_by_lora_ids[:n].copy_(order)
        lora_ids, counts = torch.unique(mapping, sorted=True, return_counts=True)
        k = lora_ids.size(0)  # data-dependent shape: the device→host sync
        self.active_lora_ids.fill_(-1)
        self.active_lora_ids[:k].copy_(lora_ids)
        self.num_tokens_per_lora.fill_(0)
        self.num_tokens_per_lora[:k].copy_(counts)
        self.lora_token_start_loc.fill_(0)
        self.lora_token_start_loc[1 : 1 + k].copy_(torch.cumsum(counts, dim=0))


def _host_us(fn, iters: int, sync) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t1 = time.perf_counter()
    sync()
    return (t1 - t0) / iters * 1e6


def _gpu_us(fn, iters: int) -> float | None:
    if not torch.cuda.is_available():
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def run(device: str, batch: int, adapter_counts: list[int], rank: int, iters: int, warmup: int) -> list[dict]:
    max_loras = max(adapter_counts)
    meta = _meta(device, batch, max_loras, rank)
    plain = _meta(device, batch, 0, rank)
    plain.prepare_decode(np.arange(batch), np.full(batch, 100))  # the batch in its staging buffer
    dev = meta.config.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    baseline = UniqueBaseline(max_loras, meta.config.max_num_tokens, dev)
    idx = np.arange(batch, dtype=np.int64)
    clens = np.full(batch, 100, np.int64)
    lora, ring, lay = meta.lora, meta._staging, meta._layout
    rows = []
    for num_adapters in adapter_counts:
        for r in range(batch):
            meta.lora.set_adapter(r, r % num_adapters, rank)
        meta.prepare_decode(idx, clens)  # stages idx and qo_indptr in the current buffer
        h = ring.host_np[ring.current]
        token_lora = (idx % num_adapters).astype(np.int32)

        def ours_host(h: np.ndarray = h) -> None:
            lora.stage(h, lay.idx, lay.qo_indptr, batch, compiled=meta._host_path is not None)

        fill, plain_fill = meta._launcher.fills[ring.current], plain._launcher.fills[plain._staging.current]

        def base(token_lora: np.ndarray = token_lora) -> None:
            baseline.prepare(token_lora)

        for fn in (ours_host, base):
            for _ in range(warmup):
                fn()
        cuda = dev.type == "cuda"
        launch_lora = _gpu_us(lambda f=fill: f(batch), iters) if cuda else None
        launch_plain = _gpu_us(lambda f=plain_fill: f(batch), iters) if cuda else None
        row = {
            "batch": batch,
            "adapters": num_adapters,
            "ours_host_us": _host_us(ours_host, iters, sync),
            "step_launch_lora_gpu_us": launch_lora,
            "step_launch_plain_gpu_us": launch_plain,
            "ours_gpu_us": None if launch_lora is None else launch_lora - launch_plain,
            "baseline_host_us": _host_us(base, iters, sync),
            "baseline_gpu_us": _gpu_us(base, iters) if dev.type == "cuda" else None,
            "prepare_decode_lora_us": _host_us(lambda: meta.prepare_decode(idx, clens), iters, sync),
            "prepare_decode_plain_us": _host_us(lambda: plain.prepare_decode(idx, clens), iters, sync),
        }
        # The metadata is right: the baseline's sorted token order and segments equal ours.
        step = meta.prepare_decode(idx, clens)
        baseline.prepare(token_lora)
        sync()
        assert torch.equal(step.lora.token_perm.cpu(), baseline.token_indices_sorted_by_lora_ids[:batch].cpu())
        k = step.lora.num_active
        assert torch.equal(step.lora.seg_lora[:k].cpu(), baseline.active_lora_ids[:k].cpu())
        assert torch.equal(step.lora.seg_indptr[: k + 1].cpu(), baseline.lora_token_start_loc[: k + 1].cpu())
        rows.append(row)
    return rows


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print("bench_lora_meta: no CUDA device; --device cpu runs the torch fallbacks", file=sys.stderr)
        return 2
    rows = run(args.device, args.batch, args.adapters, args.rank, args.iters, args.warmup)
    name = torch.cuda.get_device_name() if args.device != "cpu" else platform.processor() or "cpu"
    print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}")
    print()
    print("| B | adapters | batchmeta host µs | step launch GPU µs, LoRA / none |", end="")
    print(" batchmeta GPU µs (LoRA's share) | unique/sort host µs | unique/sort GPU µs |", end="")
    print(" prepare_decode LoRA µs | prepare_decode no LoRA µs |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        launches = f"{_fmt(r['step_launch_lora_gpu_us'])} / {_fmt(r['step_launch_plain_gpu_us'])}"
        print(
            f"| {r['batch']} | {r['adapters']} | {_fmt(r['ours_host_us'])} | {launches} | {_fmt(r['ours_gpu_us'])} | "
            f"{_fmt(r['baseline_host_us'])} | {_fmt(r['baseline_gpu_us'])} | "
            f"{_fmt(r['prepare_decode_lora_us'])} | {_fmt(r['prepare_decode_plain_us'])} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
