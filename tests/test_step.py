"""``batchmeta.ops.step`` (internal): ``fill_step_metadata`` / ``bind_step_metadata`` /
``bind_scatter_pairs``, the fused per-step launch over a fixed buffer layout, against a naive
per-request loop.

Layouts are built with gaps between fields, and every buffer starts filled with a sentinel, so a
wrong offset or an element written where it must not be shows up.
"""

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import batchmeta.ops.step as step_ops
from batchmeta.ops.step import StepLayout, bind_scatter_pairs, bind_step_metadata, fill_step_metadata

S = 77_777  # sentinel
GAP = 3  # unused elements between fields
GUARD = 8  # elements before and after each buffer


def cdiv(a, b):
    return -(-a // b)


class Case:
    """Buffers and layout for ``groups`` (page sizes) and ``rows`` of (request slot, cache_len,
    query_len); every group's table gets random pages, each row holds at least what it needs."""

    def __init__(
        self,
        draw_int,
        page_sizes,
        rows,
        *,
        num_slots,
        width_mult,
        full_width,
        extra_held,
        device,
        num_writes=0,
        pinned=False,
    ):
        self.page_sizes = page_sizes
        self.rows = rows
        b = len(rows)
        self.widths = [max(1, cdiv(max([c + q for _, c, q in rows] + [1]), ps)) * width_mult for ps in page_sizes]
        self.num_slots = num_slots
        self.token_capacity = sum(q for _, _, q in rows) + draw_int(0, 5)
        # Persistent tables with their held counts.
        self.tables = []
        self.held = []
        for ps, w in zip(page_sizes, self.widths, strict=True):
            t = [[draw_int(0, 10_000) for _ in range(w)] for _ in range(num_slots)]
            h = [draw_int(0, w) for _ in range(num_slots)]
            for r, c, q in rows:
                h[r] = min(w, cdiv(c + q, ps) + extra_held)
            self.tables.append(t)
            self.held.append(h)
        self.qo_indptr = [0]
        for _, _, q in rows:
            self.qo_indptr.append(self.qo_indptr[-1] + q)
        self.indptr = []
        self.step_width = []
        for ps, w in zip(page_sizes, self.widths, strict=True):
            pages = [cdiv(c + q, ps) for _, c, q in rows]
            ip = [0]
            for p in pages:
                ip.append(ip[-1] + p)
            self.indptr.append(ip)
            self.step_width.append(w if full_width else max([*pages, 0]))
        # Lay everything out with gaps.
        staging, tables, out32, out64 = [], [], [], []
        self.num_writes = num_writes

        # The kernel's packed rows: per row, the fields above (see batchmeta.ops.step), then a tail
        # row with the indptrs' ends. The torch twin reads the fields, the kernel the rows.
        logits = [draw_int(0, 99) for _ in rows]
        last = [[draw_int(1, ps) for _ in rows] for ps in page_sizes]
        stride = 16 * -(-(7 + 4 * len(page_sizes)) // 16)
        packed = []
        for i, (r, c, q) in enumerate([*rows, (0, 0, 0)]):
            tail = i == len(rows)
            lo = self.qo_indptr[i]
            row = [
                0 if tail else r,
                lo,
                lo if tail else self.qo_indptr[i + 1],
                0 if tail else c,
                0 if tail else c + q,
                0 if tail else logits[i],
                num_writes,
            ]
            for g in range(len(page_sizes)):
                kv = self.indptr[g]
                row += [kv[i], kv[i] if tail else kv[i + 1], 0 if tail else last[g][i], self.step_width[g]]
            packed += row + [0] * (stride - len(row))

        def put(buf, values):
            at = len(buf) + GAP
            buf.extend([S] * GAP)
            buf.extend(values)
            return at

        g_ = range(len(page_sizes))
        lay = dict(
            idx=put(staging, [r for r, _, _ in rows]),
            qo_indptr=put(staging, self.qo_indptr),
            cache_lens=put(staging, [c for _, c, _ in rows]),
            seq_lens=put(staging, [c + q for _, c, q in rows]),
            logits=put(staging, logits),
            kv_indptr=[put(staging, self.indptr[g]) for g in g_],
            last_page_len=[put(staging, last[g]) for g in g_],
            row_stride=stride,
            rows=put(staging, packed),
            step_width=[put(staging, [self.step_width[g]]) for g in g_],
            num_writes=put(staging, [num_writes]),
            pairs=put(staging, [S] * (2 * num_writes + 4)),
            max_writes=num_writes + 2,
            table=[put(tables, [v for row in self.tables[g] for v in row]) for g in g_],
            held=[put(tables, self.held[g]) for g in g_],
            kv_capacity=[self.indptr[g][-1] + draw_int(0, 3) for g in g_],
        )
        lay["kv_indices"] = [put(out32, [S] * lay["kv_capacity"][g]) for g in g_]
        lay["step_table"] = [put(out32, [S] * (b * self.widths[g])) for g in g_]
        lay["positions"] = put(out64, [S] * self.token_capacity)
        lay["slot_mapping"] = [put(out64, [S] * self.token_capacity) for g in g_]
        for buf in (staging, tables, out32, out64):
            buf.extend([S] * GAP)
        self.layout = StepLayout(
            page_size=page_sizes, width=self.widths, num_table_rows=num_slots, token_capacity=self.token_capacity, **lay
        )
        # Staged writes: the tables above are what the rows hold after them. Each write's target
        # gets a stale value in the buffer (the write must land), at unique offsets anywhere in the
        # tables (rows in the batch or not, held counts, gaps) and a few outside (dropped).
        targets = [i for i, v in enumerate(tables) if v != S or draw_int(0, 3) == 0]
        chosen = []
        for _ in range(num_writes):
            if draw_int(0, 9) == 0:
                chosen.append((len(tables) + draw_int(0, 5), draw_int(0, 99)))  # outside: dropped
                continue
            t = targets[draw_int(0, len(targets) - 1)]
            if t in [c for c, _ in chosen]:
                chosen.append((-1 - draw_int(0, 3), 5))  # negative: dropped
                continue
            chosen.append((t, tables[t]))
        self.expected_tables = list(tables)
        for t, v in chosen:
            if 0 <= t < len(tables):
                tables[t] = v + 1000  # stale: the write must replace it
        for i, (t, v) in enumerate(chosen):
            staging[lay["pairs"] + 2 * i] = t
            staging[lay["pairs"] + 2 * i + 1] = v
        # Each buffer is the middle of a larger one whose guard regions must stay untouched.
        self.staging_values = staging
        self.guarded = [
            torch.tensor([S] * GUARD + buf + [S] * GUARD, dtype=dt, device=device)
            for buf, dt in (
                (staging, torch.int32),
                (tables, torch.int32),
                (out32, torch.int32),
                (out64, torch.int64),
                ([S] * len(staging), torch.int32),
            )
        ]
        if pinned:  # staging in pinned host memory, read by the kernel in place (zero-copy)
            self.guarded[0] = self.guarded[0].cpu().pin_memory()
        self.staging, self.table_buf, self.out32, self.out64, self.mirror = (g[GUARD:-GUARD] for g in self.guarded)

    def expected_mirror(self, mirror="fields"):
        """The mirror after a launch with it: the rows' staged fields (and with ``"rows"`` the
        ``b + 1`` packed rows), sentinels everywhere else."""
        lay, b = self.layout, len(self.rows)
        out = [S] * len(self.staging_values)
        if mirror == "none":
            return out
        fields = [(lay.idx, b), (lay.qo_indptr, b + 1), (lay.cache_lens, b), (lay.seq_lens, b), (lay.logits, b)]
        fields += [(at, b + 1) for at in lay.kv_indptr] + [(at, b) for at in lay.last_page_len]
        if mirror == "rows":
            fields.append((lay.rows, (b + 1) * lay.row_stride))
        for at, n in fields:
            out[at : at + n] = self.staging_values[at : at + n]
        return out

    def expected(self):
        """Naive per-request loop over the layout: the outputs every field should hold."""
        lay = self.layout
        for g in self.guarded:
            assert (g[:GUARD] == S).all() and (g[-GUARD:] == S).all(), "a write outside its buffer"
        assert self.table_buf.cpu().tolist() == self.expected_tables, "staged writes not applied"
        out32 = self.out32.cpu().tolist()
        out64 = self.out64.cpu().tolist()
        t = 0
        for b, (r, c, q) in enumerate(self.rows):
            for j in range(q):
                p = c + j
                out64[lay.positions + t] = p
                for g, ps in enumerate(self.page_sizes):
                    # The last table row is the padding row: its tokens get PAD slots.
                    slot = -1 if r == lay.num_table_rows - 1 else self.tables[g][r][p // ps] * ps + p % ps
                    out64[lay.slot_mapping[g] + t] = slot
                t += 1
            for g in range(len(self.page_sizes)):
                row = self.tables[g][r]
                held = self.held[g][r]
                for col in range(self.step_width[g]):
                    out32[lay.step_table[g] + b * self.widths[g] + col] = row[col] if col < held else 0
                lo, hi = self.indptr[g][b], self.indptr[g][b + 1]
                for col in range(hi - lo):
                    out32[lay.kv_indices[g] + lo + col] = row[col]
        for tt in range(t, self.token_capacity):
            out64[lay.positions + tt] = 0
            for g in range(len(self.page_sizes)):
                out64[lay.slot_mapping[g] + tt] = -1
        return out32, out64


@st.composite
def cases(draw, device=None):
    num_groups = draw(st.integers(1, 5), label="num_groups")  # 5: two launches
    page_sizes = [draw(st.sampled_from([1, 2, 3, 16]), label="page_size") for _ in range(num_groups)]
    num_slots = draw(st.integers(1, 6), label="num_slots")
    num_rows = draw(st.integers(0, num_slots), label="num_rows")
    slots = draw(st.permutations(range(num_slots)))[:num_rows]
    rows = []
    for r in slots:
        c = draw(st.integers(0, 20))
        q = draw(st.integers(0, 6))  # 0: a CUDA-graph padding row
        if draw(st.booleans()):  # end exactly on a page boundary of group 0
            ps = page_sizes[0]
            c = max(0, cdiv(c + q, ps) * ps - q)
        rows.append((r, c, q))

    def draw_int(lo, hi):
        return draw(st.integers(lo, hi))

    return Case(
        draw_int,
        page_sizes,
        rows,
        num_slots=num_slots,
        width_mult=draw(st.sampled_from([1, 2])),
        full_width=draw(st.booleans()),
        extra_held=draw(st.integers(0, 2)),
        device=device,
        num_writes=draw(st.sampled_from([0, 1, 5, 40])),
        pinned=device is not None and torch.device(device).type == "cuda" and draw(st.booleans(), label="pinned"),
    )


MIRRORS = st.sampled_from(["none", "fields", "rows"])  # no mirror, the staged fields, and the packed rows too


def check_case(case, mirror):
    exp32, exp64 = case.expected()
    assert case.out32.cpu().tolist() == exp32
    assert case.out64.cpu().tolist() == exp64
    assert case.mirror.cpu().tolist() == case.expected_mirror(mirror)
    assert case.staging.cpu().tolist() == case.staging_values  # read only


def max_cols_of(case):
    """The tightest column bound a caller may pass: every row's pages and the per-step table width."""
    return max(
        [case.indptr[g][b + 1] - case.indptr[g][b] for g in range(len(case.page_sizes)) for b in range(len(case.rows))]
        + case.step_width
        + [0]
    )


@contextlib.contextmanager
def columns_per_program(n):
    """Long rows split over programs of ``n`` columns (the kernel's default splits only huge rows)."""
    saved, step_ops._COLS = step_ops._COLS, n
    try:
        yield
    finally:
        step_ops._COLS = saved


@given(data=st.data(), mirror=MIRRORS, cols=st.sampled_from([1, 3, 4096]), tight=st.booleans())
def test_fill_step_metadata_matches_naive(data, mirror, cols, tight, device, backend):
    case = data.draw(cases(device=device))
    with columns_per_program(cols):
        fill_step_metadata(
            case.layout,
            case.staging,
            case.table_buf,
            case.out32,
            case.out64,
            len(case.rows),
            mirror=None if mirror == "none" else case.mirror,
            max_cols=max_cols_of(case) if tight else None,
            backend=backend,
            mirror_rows=mirror == "rows",
        )
    check_case(case, mirror)


@given(data=st.data(), mirror=MIRRORS, cols=st.sampled_from([1, 3, 4096]), tight=st.booleans())
def test_bound_fill_matches_naive(data, mirror, cols, tight, device):
    case = data.draw(cases(device=device))
    with columns_per_program(cols):
        fill = bind_step_metadata(
            case.layout,
            case.staging,
            case.table_buf,
            case.out32,
            case.out64,
            max_rows=len(case.rows),
            mirror=None if mirror == "none" else case.mirror,
        )
        max_cols = max_cols_of(case) if tight else None
        fill(len(case.rows), max_cols, mirror_rows=mirror == "rows")
        fill(len(case.rows), max_cols, mirror_rows=mirror == "rows")  # the bound (cached) launch, on a GPU
    check_case(case, mirror)


def test_staging_must_be_on_the_device_or_pinned(device):
    case = _small_case(device)
    with pytest.raises(ValueError, match="mirror"):
        fill_step_metadata(case.layout, case.staging, case.table_buf, case.out32, case.out64, 1, mirror=case.mirror[:3])
    bufs = (case.layout, case.staging, case.table_buf, case.out32, case.out64, 1)
    for mirror, rows in ((None, None), (case.mirror, case.mirror)):  # no mirror to copy into; rows read from it
        with pytest.raises(ValueError, match="mirror_rows"):
            fill_step_metadata(*bufs, mirror=mirror, rows=rows, mirror_rows=True)
    assert case.out64.cpu().eq(S).all() and case.mirror.cpu().eq(S).all()  # nothing written
    if device.type != "cuda":
        return
    with pytest.raises(ValueError, match=r"staging: .*not pinned"):
        fill_step_metadata(case.layout, case.staging.cpu(), case.table_buf, case.out32, case.out64, 1)


def _small_case(device):
    values = iter(range(1, 10_000))
    return Case(
        lambda lo, hi: min(hi, lo + next(values) % (hi - lo + 1)),
        [16],
        [(0, 5, 2)],
        num_slots=2,
        width_mult=1,
        full_width=False,
        extra_held=0,
        device=device,
    )


@pytest.mark.parametrize("buffer", ["staging", "tables", "out32", "out64"])
def test_layout_too_large_for_a_buffer_raises_before_writing(device, buffer):
    case = _small_case(device)
    bufs = dict(staging=case.staging, tables=case.table_buf, out32=case.out32, out64=case.out64)
    bufs[buffer] = bufs[buffer][:3]
    before = [t.clone() for t in bufs.values()]
    with pytest.raises(ValueError, match=buffer):
        fill_step_metadata(case.layout, *bufs.values(), 1)
    with pytest.raises(ValueError, match=buffer):
        bind_step_metadata(case.layout, *bufs.values(), max_rows=1)
    assert all(torch.equal(a, b) for a, b in zip(before, bufs.values(), strict=True))


def test_layout_wrong_dtype_and_group_count(device):
    case = _small_case(device)
    with pytest.raises(TypeError, match="out64"):
        fill_step_metadata(case.layout, case.staging, case.table_buf, case.out32, case.out64.int(), 1)
    bad = StepLayout(**{**{f.name: getattr(case.layout, f.name) for f in case.layout.__attrs_attrs__}, "held": (0, 1)})
    with pytest.raises(ValueError, match=r"layout\.held"):
        fill_step_metadata(bad, case.staging, case.table_buf, case.out32, case.out64, 1)


@given(
    writes=st.lists(
        st.tuples(st.integers(-3, 40), st.integers(-(2**31), 2**31 - 1)), max_size=30, unique_by=lambda w: w[0]
    ),
    count_at=st.integers(0, 2),
    gap=st.integers(0, 3),
)
def test_bind_scatter_pairs_matches_naive(device, writes, count_at, gap):
    n = len(writes)
    max_writes = n + 2
    pairs_at = count_at + 1 + gap
    staging = torch.full((pairs_at + 2 * max_writes + 2,), S, dtype=torch.int32)
    staging[count_at] = n
    for i, (off, val) in enumerate(writes):
        staging[pairs_at + 2 * i] = off
        staging[pairs_at + 2 * i + 1] = val
    dst = torch.full((32,), S, dtype=torch.int32)
    expected = dst.tolist()
    for off, val in writes:
        if 0 <= off < 32:
            expected[off] = val
    staging, dst = staging.to(device), dst.to(device)
    scatter = bind_scatter_pairs(staging, dst, count=count_at, pairs=pairs_at, max_writes=max_writes)
    scatter(n)
    scatter(n)  # idempotent; the bound launch on a GPU
    assert dst.cpu().tolist() == expected


def test_bind_scatter_pairs_checks_capacity(device):
    staging = torch.zeros(10, dtype=torch.int32, device=device)
    dst = torch.zeros(4, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="staging"):
        bind_scatter_pairs(staging, dst, count=0, pairs=1, max_writes=5)
    with pytest.raises(TypeError, match="dst"):
        bind_scatter_pairs(staging, dst.long(), count=0, pairs=1, max_writes=2)
