"""GPU µs per ``store_kv`` / ``store_mla_kv`` call: plain, fp8 with scales, and MLA.

Run on a machine with CUDA:  python benchmarks/bench_store_kv.py [--baseline-root DIR]

``--baseline-root`` names another checkout whose ``batchmeta/ops/kv_cache.py`` ``store_kv`` is timed
beside this one's for the unscaled cases (an A/B of the kernel). Times are Triton's ``do_bench``
medians (L2 flushed between calls); each token's slot is distinct and random, every 8th token PAD.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch
import triton
from triton.testing import do_bench

from batchmeta.ops import store_kv, store_mla_kv


def _load_store_kv(root: str):
    spec = importlib.util.spec_from_file_location("_baseline_kv_cache", f"{root}/batchmeta/ops/kv_cache.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.store_kv


def _slots(num_tokens: int, num_slots: int, dev: torch.device) -> torch.Tensor:
    slots = torch.randperm(num_slots, device=dev)[:num_tokens]
    slots[::8] = -1
    return slots


def _us(fn, *args, **kwargs) -> float:
    return do_bench(lambda: fn(*args, **kwargs)) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-root", help="another checkout to compare the unscaled store_kv with")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_store_kv needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    baseline = _load_store_kv(args.baseline_root) if args.baseline_root else None
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print()
    print("| op | tokens | cache | GPU µs | baseline GPU µs |")
    print("|---|---:|---|---:|---:|")
    pages, page_size, heads, dim = 4096, 16, 8, 128
    for num_tokens in (256, 8192):
        slots = _slots(num_tokens, pages * page_size, dev)
        key = torch.randn(num_tokens, heads, dim, device=dev, dtype=torch.bfloat16)
        value = torch.randn_like(key)
        for dtype, scales in ((torch.bfloat16, {}), (torch.float8_e4m3fn, {"k_scale": 0.37, "v_scale": 1.9})):
            kv = torch.zeros(pages, 2, page_size, heads, dim, device=dev, dtype=dtype)
            us = _us(store_kv, key, value, slots, kv[:, 0], kv[:, 1], **scales)
            base = "-"
            if baseline is not None and not scales:
                base = f"{_us(baseline, key, value, slots, kv[:, 0], kv[:, 1]):.1f}"
            name = str(dtype).replace("torch.", "") + (" scaled" if scales else "")
            print(f"| store_kv H={heads} D={dim} | {num_tokens} | {name} | {us:.1f} | {base} |")
        ckv = torch.randn(num_tokens, 512, device=dev, dtype=torch.bfloat16)
        kpe = torch.randn(num_tokens, 64, device=dev, dtype=torch.bfloat16)
        both = torch.zeros(pages, page_size, 576, device=dev, dtype=torch.bfloat16)
        us = _us(store_mla_kv, ckv, kpe, slots, both[..., :512], both[..., 512:])
        print(f"| store_mla_kv 512 + 64 | {num_tokens} | bfloat16 | {us:.1f} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
