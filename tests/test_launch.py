"""The launch-overhead cache (SPEC bug 8: a launch cache keyed too loosely is a silent wrong result).

On the CPU the key function is checked directly: every argument change that changes Triton's
specialization must change the key, and changes that do not should not. On a GPU, cached and
uncached launches must give identical outputs while each of those arguments changes.
"""

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from batchmeta import launch
from batchmeta.launch import CachedKernel, _make_prep_fn, _Unkeyable


def _probe(x_ptr, out_ptr, n, stride, offset, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = x[i * stride] (+ or *) (offset // 2**20): ``offset`` past 2^31 needs an i64 binary,
    ``stride == 1`` gets its own specialization, ``MODE`` changes the code."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(x_ptr + i * stride, mask=m, other=0).to(tl.float32)
    k = (offset // 1048576).to(tl.float32)
    if MODE == 0:
        y = x + k
    else:
        y = x * k
    tl.store(out_ptr + i, y.to(out_ptr.dtype.element_ty), mask=m)


# Built explicitly so the CPU tests get a real JITFunction even under TRITON_INTERPRET=1.
_probe_jit = JITFunction(_probe)


_prep = _make_prep_fn(_probe_jit.params)


class _OnDevice(torch.Tensor):
    """A CPU tensor that claims to be on CUDA, so the key can be computed without a GPU."""

    @property
    def is_cuda(self):
        return True


def _t(n, dtype=torch.float32, offset=0):
    """A tensor on the GPU when there is one, else a CPU stand-in."""
    if torch.cuda.is_available():
        return torch.zeros(n + offset, dtype=dtype, device="cuda")[offset:]
    return torch.Tensor._make_subclass(_OnDevice, torch.zeros(n + offset, dtype=dtype)[offset:])


def _key(args, num_warps=None):
    return _prep(args)[0], num_warps


class TestKeyFunction:
    x = _t(64)
    out = _t(64)
    base = (x, out, 10, 2, 100, 0, 32)

    def with_arg(self, i, v):
        args = list(self.base)
        args[i] = v
        return tuple(args)

    @pytest.mark.parametrize(
        "index, value, why",
        [
            (0, _t(64, torch.float16), "dtype"),
            (0, _t(64, offset=1), "16-byte alignment"),
            (4, 2**31 + 5, "int crossing 2^31 (i32 -> i64)"),
            (4, -(2**31) - 1, "int below -2^31"),
            (4, 2**63 + 1, "int past 2^63 (u64)"),
            (3, 1, "int == 1"),
            (2, 16, "int divisible by 16"),
            (5, 1, "constexpr MODE"),
            (6, 64, "constexpr BLOCK"),
        ],
    )
    def test_change_that_changes_specialization_changes_key(self, index, value, why):
        assert _key(self.base) != _key(self.with_arg(index, value)), why

    def test_num_warps_in_key(self):
        assert _key(self.base, 4) != _key(self.base, 8)

    def test_same_specialization_same_key(self):
        # Other values in the same class (not 1, not a multiple of 16, i32) and another aligned tensor.
        other = (_t(128), _t(8), 11, 3, 99, 0, 32)
        assert _key(self.base) == _key(other)

    def test_full_key_has_num_stages_and_device(self):
        # CachedKernel.key appends (num_warps, num_stages, device); the device part needs CUDA.
        if not torch.cuda.is_available():
            pytest.skip("CachedKernel.key reads the current CUDA device")
        k = CachedKernel(_probe_jit)
        assert k.key(self.base, 4, 2) != k.key(self.base, 4, 3)
        assert k.key(self.base)[-1] == torch.cuda.current_device()

    def test_unkeyable_argument_raises(self):
        with pytest.raises(_Unkeyable):
            _prep((self.x, self.out, "ten", 2, 100, 0, 32))

    def test_host_tensor_is_unkeyable(self):
        # A CPU tensor must reach Triton's normal path, which rejects it with a clear error.
        with pytest.raises(_Unkeyable):
            _prep((torch.zeros(64), self.out, 10, 2, 100, 0, 32))

    def test_tensors_become_addresses(self):
        _, launch_args = _prep(self.base)
        assert launch_args == (self.x.data_ptr(), self.out.data_ptr(), 10, 2, 100, 0, 32)

    def test_float_keyed_by_type(self):
        assert _key(self.with_arg(4, 1.5)) == _key(self.with_arg(4, 2.5))
        assert _key(self.with_arg(4, 1.5)) != _key(self.base)

    def test_wrong_arity_is_unkeyable(self):
        with pytest.raises(_Unkeyable):
            CachedKernel(_probe_jit).key(self.base[:-1])


def test_interpreted_function_always_takes_normal_path():
    if torch.cuda.is_available():
        pytest.skip("only meaningful under TRITON_INTERPRET=1")
    k = CachedKernel(triton.jit(_probe))
    assert not k.supported
    x = torch.arange(8, dtype=torch.float32)
    out = torch.zeros(8)
    k.launch((1,), (x, out, 8, 1, 3 * 2**20, 0, 8))
    assert torch.equal(out, x + 3)
    assert k.hits == 0


# --------------------------------------------------------------------------------------------------
# GPU: cached launches equal uncached ones while the specialization changes
# --------------------------------------------------------------------------------------------------
def _run(kernel, x, n, stride, offset, mode, block, num_warps, dtype=torch.float32):
    out = torch.full((n,), -1.0, dtype=dtype, device=x.device)
    kernel.launch((triton.cdiv(n, block),), (x, out, n, stride, offset, mode, block), num_warps=num_warps)
    return out


@pytest.mark.gpu
def test_cached_equals_uncached_across_specializations():
    cached = CachedKernel(JITFunction(_probe))
    plain = CachedKernel(JITFunction(_probe))
    plain.supported = False  # every launch binds as Triton does
    dev = torch.device("cuda")
    base = torch.arange(1, 4097, dtype=torch.float32, device=dev)
    cases = [
        # (x, n, stride, offset, mode, block, num_warps)
        (base, 1000, 2, 7 * 2**20, 0, 128, 4),
        (base, 1000, 2, 7 * 2**20, 0, 128, 4),  # a hit
        (base.half(), 1000, 2, 7 * 2**20, 0, 128, 4),  # dtype
        (base[1:], 1000, 2, 7 * 2**20, 0, 128, 4),  # alignment
        (base, 1000, 1, 7 * 2**20, 0, 128, 4),  # stride == 1
        (base, 1000, 2, 2**31 - 2**20, 0, 128, 4),  # i32, just below 2^31
        (base, 1000, 2, 2**31 + 3 * 2**20, 0, 128, 4),  # crosses 2^31: needs i64
        (base, 1000, 2, 7 * 2**20, 1, 128, 4),  # constexpr MODE
        (base, 1000, 2, 7 * 2**20, 0, 256, 4),  # constexpr BLOCK
        (base, 1000, 2, 7 * 2**20, 0, 128, 1),  # num_warps
        (base, 1000, 2, 7 * 2**20, 0, 128, 8),
        (base, 1024, 2, 7 * 2**20, 0, 128, 4),  # n divisible by 16
    ]
    # Run everything twice: the second round is all hits and must still match.
    for _ in range(2):
        for x, n, stride, offset, mode, block, warps in cases:
            a = _run(cached, x, n, stride, offset, mode, block, warps)
            b = _run(plain, x, n, stride, offset, mode, block, warps)
            torch.cuda.synchronize()
            assert torch.equal(a, b), (x.dtype, n, stride, offset, mode, block, warps)
            expect_x = x[: (n - 1) * stride + 1 : stride].float()
            k = offset // 2**20
            expect = expect_x + k if mode == 0 else expect_x * k
            assert torch.equal(a, expect)
    assert cached.hits >= len(cases)
    assert plain.hits == 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cached_launch_follows_the_current_device():
    k = CachedKernel(JITFunction(_probe))
    for dev in (0, 1, 0, 1):
        with torch.cuda.device(dev):
            x = torch.arange(256, dtype=torch.float32, device=f"cuda:{dev}")
            out = _run(k, x, 256, 1, 2**20, 0, 128, 4)
            torch.cuda.synchronize()
            assert torch.equal(out, x + 1)
    assert len(k._cache) == 2


@pytest.mark.gpu
def test_launch_hook_forces_normal_path():
    k = CachedKernel(JITFunction(_probe))
    x = torch.arange(256, dtype=torch.float32, device="cuda")
    _run(k, x, 256, 1, 2**20, 0, 128, 4)
    _run(k, x, 256, 1, 2**20, 0, 128, 4)
    hits = k.hits
    seen = []
    hook = lambda metadata: seen.append(metadata)
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        _run(k, x, 256, 1, 2**20, 0, 128, 4)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert seen, "a registered launch hook must see the launch"
    assert k.hits == hits


@pytest.mark.gpu
def test_disabled_cache_never_hits():
    k = CachedKernel(JITFunction(_probe))
    x = torch.arange(256, dtype=torch.float32, device="cuda")
    launch.set_launch_cache_enabled(False)
    try:
        for _ in range(3):
            _run(k, x, 256, 1, 2**20, 0, 128, 4)
    finally:
        launch.set_launch_cache_enabled(True)
    assert k.hits == 0


@pytest.mark.gpu
def test_verified_triton_launches_through_c_entry_point():
    """On the Triton releases read here (3.6-3.9), the launcher source must match a verified hash;
    a new patch release that changes it silently falls back to the slower wrapper, so say so."""
    from batchmeta.launch import _launcher_form

    fn = JITFunction(_probe)
    x = torch.arange(256, dtype=torch.float32, device="cuda")
    out = torch.empty_like(x)
    compiled = fn.run(x, out, 256, 1, 2**20, 0, 128, grid=(2,), warmup=False)
    assert _launcher_form(compiled.run) in ("3.6", "3.7"), f"triton {triton.__version__}: launcher not verified"


def test_bound_launch_without_cuda_takes_the_normal_path():
    """Interpreter or CPU tensors: no key, every call launches the normal way (and still works)."""
    if not launch._INTERPRET:
        pytest.skip("CPU tensors launch only under the interpreter")
    x = torch.arange(64, dtype=torch.float32)
    out = torch.zeros_like(x)
    k = CachedKernel(triton.jit(_probe))  # an InterpretedFunction under TRITON_INTERPRET=1
    bound = k.bind((x, out, 64, 1, 2**20, 0, 32))
    bound((2,))
    assert torch.equal(out, x + 1)


@pytest.mark.gpu
def test_bound_launch_equals_plain_launch_and_survives_cache_clears():
    k = CachedKernel(JITFunction(_probe))
    x = torch.arange(256, dtype=torch.float32, device="cuda")
    out = torch.zeros_like(x)
    bound = k.bind((x, out, 256, 1, 3 * 2**20, 1, 128), num_warps=4)
    for grid in ((1,), (2,), (2,)):  # first call binds normally, the rest are direct
        out.zero_()
        bound(grid)
        torch.cuda.synchronize()
        n = 128 * grid[0]
        assert torch.equal(out[:n], x[:n] * 3) and not out[n:].any()
    assert k.hits >= 1
    hits = k.hits
    launch.clear_launch_caches()
    x.add_(1)  # new data in the same buffer: the bound arguments are addresses
    bound((2,))
    torch.cuda.synchronize()
    assert torch.equal(out, x * 3)
    assert k.hits == hits, "after a clear the next launch must bind normally again"
    bound((2,))
    assert k.hits == hits + 1
