"""``pack_seq`` / ``unpack_seq``: ragged token-major tensors <-> padded batch-major tensors.

Results are compared with ``torch.equal`` to naive per-sequence Python loops; outputs start full of a
sentinel so unwritten or overwritten elements show.
"""

import inspect

import pytest
import torch
import triton.language as tl
from _helpers import case_device, on_host
from hypothesis import given
from hypothesis import strategies as st

import batchmeta.ops.pack as pack_module
from batchmeta.ops import pack_seq, unpack_seq

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.int32]
FEATURE_SHAPES = [(), (3,), (2, 65), (1, 1, 130)]  # 2 * 65 and 130 features: more than one feature tile


# --------------------------------------------------------------------------------------------------
# Naive references
# --------------------------------------------------------------------------------------------------
def naive_pack(x, lengths, max_len, pad_value):
    """``out[b, t] = x[start_b + t]`` for ``t < min(len_b, max_len)``, else ``pad_value``."""
    out = torch.empty((len(lengths), max_len, *x.shape[1:]), dtype=x.dtype)
    start = 0
    for b, n in enumerate(lengths):
        for i in range(max_len):
            out[b, i] = x[start + i] if i < n else pad_value
        start += n
    return out


def naive_unpack(packed, lengths, out):
    """``out[start_b + t] = packed[b, t]`` for ``t < min(len_b, Lmax)``; other rows of ``out`` keep
    their values."""
    out = out.clone()
    start = 0
    for b, n in enumerate(lengths):
        for i in range(min(n, packed.shape[1])):
            out[start + i] = packed[b, i]
        start += n
    return out


def make_values(gen, shape, dtype):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    hi = 2**40 if dtype == torch.int64 else 2**31 - 1  # int64 data past 2^24 must stay exact
    return torch.randint(-hi, hi, shape, generator=gen, dtype=torch.int64).to(dtype)


def sentinel_for(dtype):
    return -12345 if not dtype.is_floating_point else -3.5


# --------------------------------------------------------------------------------------------------
# Round trips against the naive loops
# --------------------------------------------------------------------------------------------------
@given(data=st.data())
def test_pack_and_unpack_match_naive(data, device, backend):
    lengths = data.draw(st.lists(st.integers(0, 8), min_size=1, max_size=8), label="lengths")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    feat = data.draw(st.sampled_from(FEATURE_SHAPES), label="feature shape")
    longest = max(lengths)
    # Lmax below the longest row cuts rows; above it pads every row.
    max_len = data.draw(st.integers(0, longest + 3), label="max_len")
    extra_rows = data.draw(st.integers(0, 3), label="rows of x past the sequences")
    pad_value = data.draw(st.sampled_from([0, -1, 7, -100]), label="pad")
    if dtype.is_floating_point:
        pad_value = pad_value + 0.5
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    x = make_values(gen, (sum(lengths) + extra_rows, *feat), dtype)
    len_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]), label="lengths dtype")
    lens = torch.tensor(lengths, dtype=len_dtype, device=device)

    out = torch.full((len(lengths), max_len, *feat), sentinel_for(dtype), dtype=dtype, device=device)
    result = pack_seq(x.to(device), lens, max_len=max_len, pad_value=pad_value, out=out, backend=backend)
    assert result is out
    expected = naive_pack(x, lengths, max_len, pad_value)
    assert torch.equal(out.cpu(), expected)

    # Back: the rows of each sequence that fit in Lmax return exactly; the others keep the sentinel.
    back = torch.full(x.shape, sentinel_for(dtype), dtype=dtype, device=device)
    unpack_seq(out, lens, out=back, backend=backend)
    assert torch.equal(
        back.cpu(), naive_unpack(expected, lengths, torch.full(x.shape, sentinel_for(dtype), dtype=dtype))
    )
    if max_len >= longest:
        assert torch.equal(back[: sum(lengths)].cpu(), x[: sum(lengths)])


def test_pack_default_max_len_and_allocated_outputs(device, backend):
    x = torch.arange(2**24, 2**24 + 9, dtype=torch.int64, device=device)[:, None] * torch.tensor(
        [1, 2**20], device=device
    )
    lengths = torch.tensor([2, 0, 4, 3], dtype=torch.int64, device=device)
    packed = pack_seq(x, lengths, pad_value=-1, backend=backend)  # Lmax = lengths.max() = 4
    assert packed.shape == (4, 4, 2) and packed.dtype == torch.int64
    assert torch.equal(packed.cpu(), naive_pack(x.cpu(), [2, 0, 4, 3], 4, -1))
    back = unpack_seq(packed, lengths, backend=backend)  # N = lengths.sum()
    assert torch.equal(back, x)


def test_pack_int64_tokens_past_2_pow_24_stay_exact(device, backend):
    # Values that fp32 cannot hold: a round trip through float would change them.
    values = [2**24 + 1, 2**40 + 3, -(2**53) - 1, 2**62 + 7, 123, 2**31 + 1]
    x = torch.tensor(values, dtype=torch.int64, device=device)
    lengths = torch.tensor([3, 0, 3], dtype=torch.int32, device=device)
    packed = pack_seq(x, lengths, max_len=4, pad_value=-1, backend=backend)
    assert packed.tolist() == [[values[0], values[1], values[2], -1], [-1] * 4, [values[3], values[4], values[5], -1]]
    back = torch.zeros_like(x)
    unpack_seq(packed, lengths, out=back, backend=backend)
    assert back.tolist() == values


def test_pack_zero_length_rows_and_empty_batch(device, backend):
    x = torch.randn(3, 4, device=device)
    lengths = torch.zeros(3, dtype=torch.int32, device=device)
    out = torch.full((3, 2, 4), 9.0, device=device)
    pack_seq(x, lengths, pad_value=-2.0, out=out, backend=backend)
    assert (out == -2.0).all()
    back = torch.full((3, 4), 9.0, device=device)
    unpack_seq(out, lengths, out=back, backend=backend)
    assert (back == 9.0).all()
    empty = pack_seq(x, torch.zeros(0, dtype=torch.int32, device=device), max_len=5, backend=backend)
    assert empty.shape == (0, 5, 4)


def test_unpack_leaves_rows_no_sequence_covers(device, backend):
    # out has more rows than the sequences cover, and one row is cut by Lmax: those rows keep their value.
    packed = torch.arange(2 * 3 * 2, dtype=torch.float32, device=device).reshape(2, 3, 2)
    lengths = torch.tensor([5, 2], dtype=torch.int32, device=device)
    out = torch.full((9, 2), -1.0, device=device)
    unpack_seq(packed, lengths, out=out, backend=backend)
    assert torch.equal(out.cpu(), naive_unpack(packed.cpu(), [5, 2], torch.full((9, 2), -1.0)))
    assert (out[3:5] == -1.0).all() and (out[7:] == -1.0).all()


# --------------------------------------------------------------------------------------------------
# No new specialization per shape
# --------------------------------------------------------------------------------------------------
def _constexpr_names(kernel):
    fn = kernel.fn  # the Python function, both compiled and interpreted
    return {
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.annotation is tl.constexpr or p.annotation == "tl.constexpr"
    }


def _do_not_specialize(kernel):
    names = kernel.do_not_specialize if hasattr(kernel, "do_not_specialize") else kernel.kwargs["do_not_specialize"]
    arg_names = list(inspect.signature(kernel.fn).parameters)
    return {arg_names[n] if isinstance(n, int) else n for n in names}


def test_pack_new_shapes_reuse_one_specialization(monkeypatch, device):
    """Differently shaped inputs of one dtype must not make Triton compile another binary.

    Triton compiles one binary per value of each constexpr and per specialization of each plain int
    argument (== 1, divisible by 16) unless the argument is marked ``do_not_specialize``. Under the
    interpreter nothing is compiled, so this records every launch's arguments and asserts that across
    shapes (a) every constexpr keeps one value per direction and (b) every int argument whose value
    changes is not specialized. On CUDA it also counts the binaries in Triton's cache.
    """
    kernel = pack_module._pack_kernel
    launches = []
    original = pack_module._pack.launch

    def spy(grid, args, **kwargs):
        launches.append(args)
        return original(grid, args, **kwargs)

    monkeypatch.setattr(pack_module._pack, "launch", spy)

    def run_shapes():
        # token counts, feature counts and Lmax of 1, 16, 17, 32..., sizes that Triton specializes on.
        for num_tokens, feat, lengths, max_len in [
            (17, (1,), [16, 1], 16),
            (1, (16,), [1], 1),
            (40, (2, 65), [7, 0, 16, 17], 17),
            (32, (), [16, 16], 32),
            (5, (3,), [2, 3], 1),
        ]:
            x = torch.randn((num_tokens, *feat), device=device)
            lengths_t = torch.tensor(lengths, dtype=torch.int32, device=device)
            packed = pack_seq(x, lengths_t, max_len=max_len, backend="triton")
            unpack_seq(packed, lengths_t, num_tokens=num_tokens, backend="triton")

    if HAS_CUDA:
        run_shapes()  # warm: one binary per direction
        caches = kernel.device_caches[torch.cuda.current_device()][0]
        compiled = len(caches)
        launches.clear()
    run_shapes()
    if HAS_CUDA:
        assert len(caches) == compiled, "a new shape compiled a new binary"

    assert len(launches) == 10
    arg_names = list(inspect.signature(kernel.fn).parameters)
    constexprs = _constexpr_names(kernel)
    unspecialized = _do_not_specialize(kernel)
    per_direction = {}
    for args in launches:
        direction = args[arg_names.index("PACK")]
        per_direction.setdefault(direction, set()).add(tuple(args[arg_names.index(n)] for n in sorted(constexprs)))
    assert set(per_direction) == {True, False}
    for direction, values in per_direction.items():
        assert len(values) == 1, f"PACK={direction}: constexprs change with the shape: {values}"
    for i, name in enumerate(arg_names):
        if name in constexprs or isinstance(launches[0][i], torch.Tensor):
            continue
        values = {args[i] for args in launches}
        if len(values) > 1:
            assert name in unspecialized, f"{name} takes values {sorted(values)} and is specialized on them"


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def _lens(values, device, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device=device)


def _typed(device, dtype, **kwargs):
    """The base pack call on data and output of ``dtype``."""
    return {
        "x": torch.arange(12, device=device).reshape(6, 2).to(dtype),
        "out": torch.full((2, 3, 2), 9, dtype=dtype, device=device),
        **kwargs,
    }


@pytest.mark.parametrize(
    ("dtype", "pad_value", "stored"),
    [
        (torch.int64, 2**40 + 1, 2**40 + 1),  # past 2^24: a float32 kernel argument rounded it
        (torch.int64, -(2**63), -(2**63)),
        (torch.int32, -5.0, -5),  # an integral float
        (torch.int32, 2**31 - 1, 2**31 - 1),
        (torch.float16, 65519.0, 65504.0),  # finite, rounds to float16's largest
        (torch.bfloat16, 0.1, 0.10009765625),
        (torch.float32, 7, 7.0),
    ],
)
def test_pack_pad_values_stored_as_the_dtype_holds_them(dtype, pad_value, stored, device, backend):
    x = torch.arange(3, device=device).to(dtype)
    out = pack_seq(x, _lens([1, 2], device), max_len=3, pad_value=pad_value, backend=backend)
    assert out.tolist() == [[0, stored, stored], [1, 2, stored]]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (lambda d: {"lengths": _lens([2, 1], d).float()}, TypeError, "lengths"),
        (lambda d: {"lengths": _lens([[2, 1]], d)}, ValueError, "lengths"),
        (on_host(lambda d: {"lengths": _lens([2, -1], d)}), ValueError, "lengths"),
        (on_host(lambda d: {"lengths": _lens([4, 3], d)}), ValueError, "lengths"),  # sum 7 > 6 rows of x
        (lambda d: {"max_len": -1}, ValueError, "max_len"),
        (lambda d: {"max_len": 2.0}, TypeError, "max_len"),
        (lambda d: {"out": torch.full((2, 3, 3), 9.0, device=d)}, ValueError, "out"),
        (lambda d: {"out": torch.full((2, 3, 2), 9, dtype=torch.int32, device=d)}, TypeError, "out"),
        (lambda d: {"x": torch.randn(2, 6, device=d).t()}, ValueError, "x"),
        (lambda d: {"x": 3}, TypeError, "x"),
        (lambda d: {"x": [[1.0, 2.0]] * 6}, TypeError, "x"),
        (lambda d: {"backend": "cuda"}, ValueError, "backend"),
        # pad_value: a number the output's dtype holds as it is.
        (lambda d: {"pad_value": float("nan")}, ValueError, "pad_value"),
        (lambda d: {"pad_value": float("-inf")}, ValueError, "pad_value"),
        (lambda d: {"pad_value": 1e39}, ValueError, "pad_value"),  # float32: inf
        (lambda d: {"pad_value": "0"}, TypeError, "pad_value"),
        (lambda d: {"pad_value": None}, TypeError, "pad_value"),
        (lambda d: {"pad_value": True}, TypeError, "pad_value"),
        (lambda d: {"pad_value": torch.tensor(0.0, device=d)}, TypeError, "pad_value"),
        (lambda d: _typed(d, torch.float16, pad_value=1e40), ValueError, "pad_value"),
        (lambda d: _typed(d, torch.float16, pad_value=65520.0), ValueError, "pad_value"),  # rounds to inf
        (lambda d: _typed(d, torch.float16, pad_value=70000), ValueError, "pad_value"),
        (lambda d: _typed(d, torch.bfloat16, pad_value=10**400), ValueError, "pad_value"),
        (lambda d: _typed(d, torch.int32, pad_value=2**40), ValueError, "pad_value"),
        (lambda d: _typed(d, torch.int32, pad_value=-(2**31) - 1), ValueError, "pad_value"),
        (lambda d: _typed(d, torch.int32, pad_value=1.5), ValueError, "pad_value"),
        (lambda d: _typed(d, torch.int64, pad_value=2**63), ValueError, "pad_value"),
        (lambda d: _typed(d, torch.int64, pad_value=float("inf")), ValueError, "pad_value"),
        (lambda d: _typed(d, torch.int64, pad_value=float(2**63)), ValueError, "pad_value"),
    ],
)
def test_pack_rejects_bad_input_before_writing(kwargs, error, match, device, backend):
    device = case_device(kwargs, device)
    args = dict(
        x=torch.randn(6, 2, device=device),
        lengths=_lens([2, 1], device),
        max_len=3,
        out=torch.full((2, 3, 2), 9.0, device=device),
        backend=backend,
    )
    args.update(kwargs(device))
    before = args["out"].clone()
    with pytest.raises(error, match=match):
        pack_seq(**args)
    assert torch.equal(args["out"], before)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (lambda d: {"lengths": _lens([2, 1, 0], d)}, ValueError, "lengths"),
        (on_host(lambda d: {"lengths": _lens([2, -1], d)}), ValueError, "lengths"),
        (lambda d: {"lengths": _lens([2, 1], d).double()}, TypeError, "lengths"),
        (on_host(lambda d: {"lengths": _lens([4, 3], d)}), ValueError, "out"),  # 7 tokens, out has 6 rows
        (lambda d: {"packed": torch.randn(2, device=d)}, ValueError, "packed"),
        (lambda d: {"out": torch.full((6, 3), 9.0, device=d)}, ValueError, "out"),
        (lambda d: {"out": torch.full((6, 2), 9.0, dtype=torch.float64, device=d)}, TypeError, "out"),
        (lambda d: {"num_tokens": -1, "out": None}, ValueError, "num_tokens"),
        (lambda d: {"backend": "torch.cuda"}, ValueError, "backend"),
    ],
)
def test_unpack_rejects_bad_input_before_writing(kwargs, error, match, device, backend):
    device = case_device(kwargs, device)
    args = dict(
        packed=torch.randn(2, 3, 2, device=device),
        lengths=_lens([2, 1], device),
        out=torch.full((6, 2), 9.0, device=device),
        backend=backend,
    )
    args.update(kwargs(device))
    before = None if args["out"] is None else args["out"].clone()
    with pytest.raises(error, match=match):
        unpack_seq(**args)
    if before is not None:
        assert torch.equal(args["out"], before)


def test_unknown_backend_rejected_on_empty_input_too(device):
    lengths = torch.zeros(0, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="backend"):
        pack_seq(torch.zeros(0, 3, device=device), lengths, max_len=0, backend="cuda")
    out = torch.full((2, 3), 9.0, device=device)
    with pytest.raises(ValueError, match="backend"):
        unpack_seq(torch.zeros(0, 4, 3, device=device), lengths, out=out, backend="cuda")
    assert (out == 9.0).all()
