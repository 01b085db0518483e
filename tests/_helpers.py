"""Helpers shared by the op tests: naive references and bad-input case plumbing."""

import torch


def on_host(case):
    """Marks a bad-input case that the op can only detect from values (lengths, prefix sums, indices).
    The ops read values only from host tensors (reading device ones would sync), so such cases run on
    CPU tensors on every machine; on a GPU the same bad values are the caller's responsibility."""
    case.on_host = True
    return case


def case_device(case, device):
    return torch.device("cpu") if getattr(case, "on_host", False) else device


def prefix_sum(counts):
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return out


def naive_copy_next(all_input_ids, cache_lens, input_lens, prompt_lens, next_ids, accepted):
    """Row b's j-th accepted token goes to column ``cache_len + input_len + j`` unless that column is
    still inside the prompt."""
    ids = [list(row) for row in all_input_ids]
    src = 0
    for b, n in enumerate(accepted):
        for j in range(n):
            col = cache_lens[b] + input_lens[b] + j
            if col >= prompt_lens[b]:
                ids[b][col] = next_ids[src + j]
        src += n
    return ids


def naive_slots_filtering(slots, filtered, counts, starts):
    """``filtered[cu[k] + j] = slots[starts[k] + j]`` for ``j < counts[k]``; the rest untouched."""
    filtered = list(filtered)
    dst = 0
    for k, n in enumerate(counts):
        for j in range(n):
            filtered[dst + j] = slots[starts[k] + j]
        dst += n
    return filtered
