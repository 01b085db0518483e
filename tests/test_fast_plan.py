"""The fast planners' one-time check against the stock plan, on CPU with fake FlashInfer wrappers.

A fake wrapper's ``plan()`` does what FlashInfer's does for the path a planner reproduces: copies its
arrays, sets the batch-dependent attributes and calls its cached module's planning function with
the argument list of one FlashInfer release. The fake planning function writes a digest of its
arguments into the pinned int workspace and returns plan info, so a fast plan equals the stock plan
exactly when it passes the same values. ``batchmeta.attention.fast_plan`` sees a fake ``flashinfer``
module of a chosen version.
"""

import logging
import sys
import types

import pytest
import torch

from batchmeta.attention import fast_plan
from batchmeta.attention.decode_planner import DecodePlanner
from batchmeta.attention.prefill_planner import PrefillPlanner

TAIL_072 = (-1, False, 0, 0)  # FA2's arguments after window_left, 0.7.2.post1's tensor-core decode
TAIL_074 = (-1, False, 0, 1, True)  # 0.7.4's: uniform_q_len = q_len_per_req, fixed_uniform_q_len


@pytest.fixture
def flashinfer_version(monkeypatch):
    """Makes ``fast_plan`` see a FlashInfer of the version given (call the fixture's value)."""

    def use(version: str) -> None:
        monkeypatch.setitem(sys.modules, "flashinfer", types.SimpleNamespace(__version__=version))
        monkeypatch.setattr(fast_plan, "flashinfer_available", lambda: True)
        fast_plan.fast_plan_conventions.cache_clear()

    fast_plan._warned.clear()
    yield use
    fast_plan.fast_plan_conventions.cache_clear()
    fast_plan._warned.clear()


def _digest(args) -> tuple:
    out = []
    for a in args:
        out.append((str(a.dtype), a.tolist()) if isinstance(a, torch.Tensor) else a)
    return tuple(out)


class FakeModule:
    """A planning function: checks its argument count, writes a digest of the arguments after the
    three workspaces into the pinned workspace and returns ``[bytes written, salt]``. ``drift``
    makes each call differ: in the bytes (``"bytes"``) or the plan info (``"info"``)."""

    def __init__(self, nargs: int, drift: str | None = None):
        self.nargs = nargs
        self.drift = drift
        self.calls: list[str] = []
        self.owner = None

    def plan(self, *args):
        if len(args) != self.nargs:
            raise TypeError(f"plan() takes {self.nargs} arguments, got {len(args)}")
        self.calls.append("stock" if self.owner._in_stock else "fast")
        n = len(self.calls)
        data = repr((_digest(args[3:]), n if self.drift == "bytes" else 0)).encode()
        pinned = args[2]
        pinned.zero_()
        pinned[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return [len(data), n if self.drift == "info" else 7]


class FakeWrapper:
    """What the planners read of every FlashInfer wrapper."""

    def __init__(self, module: FakeModule, backend: str):
        module.owner = self
        self._module = module
        self.device = torch.device("cpu")
        self.is_cuda_graph_enabled = False
        self._jit_module = None
        self._cached_module = None
        self._backend = backend
        self._float_workspace_buffer = torch.zeros(64, dtype=torch.uint8)
        self._int_workspace_buffer = torch.zeros(1024, dtype=torch.uint8)
        self._pin_memory_int_workspace_buffer = torch.zeros(1024, dtype=torch.uint8)
        self._in_stock = False
        self.stock_plans = 0

    def _call(self, *args):
        self._in_stock = True
        try:
            return self._module.plan(*args)
        finally:
            self._in_stock = False


class FakeDecodeWrapper(FakeWrapper):
    """``BatchDecodeWithPagedKVCacheWrapper``'s plan() on its CUDA-core and tensor-core (FA2) paths."""

    def __init__(self, module: FakeModule, use_tensor_cores: bool = False, fa2_tail: tuple = TAIL_074):
        super().__init__(module, "auto")
        self.use_tensor_cores = use_tensor_cores
        self._fa2_tail = fa2_tail
        self._uses_cudnn = False
        self._block_tables = None

    def plan(
        self,
        indptr,
        indices,
        last_page_len,
        hq,
        hkv,
        d,
        ps,
        *,
        window_left=-1,
        logits_soft_cap=None,
        q_data_type=torch.float16,
        kv_data_type=None,
        sm_scale=None,
    ):
        self.stock_plans += 1
        b = len(last_page_len)
        self._paged_kv_indptr_buf = indptr.clone()
        self._paged_kv_indices_buf = indices.clone()
        self._paged_kv_last_page_len_buf = last_page_len.clone()
        self._qo_indptr_buf = torch.arange(b + 1, dtype=torch.int32)
        self._batch_size = b
        self._q_len_per_req = 1
        self._cached_module = self._module
        seq_lens = (indptr[1:] - indptr[:-1] - 1) * ps + last_page_len
        ws = (self._float_workspace_buffer, self._int_workspace_buffer, self._pin_memory_int_workspace_buffer)
        if self.use_tensor_cores:
            self._backend = "fa2"
            self._max_kv_len = int(seq_lens.max())
            self._plan_info = self._call(
                *ws,
                torch.arange(b + 1, dtype=torch.int32),
                indptr,
                seq_lens,
                b,
                b,
                hq,
                hkv,
                ps,
                False,
                d,
                d,
                False,
                window_left,
                *self._fa2_tail,
            )
        else:
            self._max_kv_len = None
            self._plan_info = self._call(
                *ws,
                indptr,
                b,
                hq,
                hkv,
                ps,
                False,
                window_left,
                logits_soft_cap or 0.0,
                d,
                d,
                torch.empty(0, dtype=q_data_type),
                torch.empty(0, dtype=kv_data_type or q_data_type),
            )


class FakePrefillWrapper(FakeWrapper):
    """``BatchPrefillWithPagedKVCacheWrapper``'s (or, ``ragged``, the ragged wrapper's) plan() on FA2."""

    def __init__(self, module: FakeModule, ragged: bool = False, fa2_tail: tuple = (-1, False, 0, 0, False)):
        super().__init__(module, "fa2")
        self.ragged = ragged
        self._fa2_tail = fa2_tail
        self._custom_mask_buf = None
        self._prefix_len_ptr = None
        self._seq_lens_kv = None
        self._seq_lens_q = None
        self._block_tables = None
        self._max_total_num_rows = None

    def plan(
        self,
        qo_indptr,
        kv_indptr,
        *rest,
        causal=True,
        window_left=-1,
        q_data_type=None,
        kv_data_type=None,
        sm_scale=None,
        logits_soft_cap=None,
    ):
        self.stock_plans += 1
        b = len(qo_indptr) - 1
        ws = (self._float_workspace_buffer, self._int_workspace_buffer, self._pin_memory_int_workspace_buffer)
        self._cached_module = self._module
        self._qo_indptr_last = int(qo_indptr[-1])
        self._qo_indptr_buf = qo_indptr.clone()
        if self.ragged:
            hq, hkv, d = rest
            self._kv_indptr_buf = kv_indptr.clone()
            self._o_indptr_buf, self._v_indptr_buf = self._qo_indptr_buf, self._kv_indptr_buf
            kv_lens = kv_indptr[1:] - kv_indptr[:-1]
            args = (qo_indptr, kv_indptr, kv_lens, self._qo_indptr_last, b, hq, hkv, 1)
        else:
            indices, last_page_len, hq, hkv, d, ps = rest
            self._paged_kv_indptr_buf = kv_indptr.clone()
            self._paged_kv_indices_buf = indices.clone()
            self._paged_kv_last_page_len_buf = last_page_len.clone()
            kv_lens = (kv_indptr[1:] - kv_indptr[:-1] - 1) * ps + last_page_len
            self._batch_size = b
            self._max_q_len = int((qo_indptr[1:] - qo_indptr[:-1]).max())
            self._max_kv_len = int(kv_lens.max())
            args = (qo_indptr, kv_indptr, kv_lens, self._qo_indptr_last, b, hq, hkv, ps)
        self._plan_info = self._call(*ws, *args, False, d, d, causal, window_left, *self._fa2_tail)


def _decode_batch(lens, page_size=4):
    """The planner's arguments for a decode batch of KV lengths ``lens``."""
    lens_t = torch.tensor(lens, dtype=torch.int32)
    pages = (lens_t + page_size - 1) // page_size
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(pages, 0)
    last = (lens_t - 1) % page_size + 1
    indices = torch.arange(int(indptr[-1]) + 5, dtype=torch.int32)
    return indptr, last, lens_t, int(lens_t.max()), indptr.clone(), indices, last.clone()


def _decode_planner(wrapper, page_size=4):
    heads = (16, 2) if wrapper.use_tensor_cores else (8, 2)
    return DecodePlanner(
        wrapper,
        num_qo_heads=heads[0],
        num_kv_heads=heads[1],
        head_dim=64,
        page_size=page_size,
        window_left=-1,
        q_data_type=torch.float16,
        kv_data_type=torch.float16,
        max_batch_size=8,
    )


def _stock_decode_state(fa2_tail, use_tensor_cores, batch):
    """What FlashInfer's stock plan leaves for ``batch``: a fresh fake wrapper planned once."""
    ref = FakeDecodeWrapper(FakeModule(16 + len(fa2_tail) if use_tensor_cores else 15), use_tensor_cores, fa2_tail)
    _decode_planner(ref).plan(*batch)  # a new planner's first plan: stock, then checked (stock last)
    return ref._plan_info, ref._pin_memory_int_workspace_buffer.clone()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "batchmeta" and r.levelno == logging.WARNING]


@pytest.mark.parametrize(
    ("version", "tensor_cores", "tail"),
    [
        ("0.7.2.post1", False, TAIL_072),
        ("0.7.4", False, TAIL_074),
        ("0.7.2.post1", True, TAIL_072),
        ("0.7.4", True, TAIL_074),
    ],
)
def test_decode_fast_plan_equal_to_stock_is_taken(flashinfer_version, caplog, version, tensor_cores, tail):
    flashinfer_version(version)
    module = FakeModule(15 if not tensor_cores else 16 + len(tail))
    wrapper = FakeDecodeWrapper(module, tensor_cores, tail)
    planner = _decode_planner(wrapper)
    with caplog.at_level(logging.INFO, logger="batchmeta"):
        planner.plan(*_decode_batch([5, 9, 1]))
        # The check: the fast plan of the first batch between two stock plans (the stock plan last).
        assert planner.fast and module.calls == ["stock", "fast", "stock"] and wrapper.stock_plans == 2
        for lens in ([7, 20], [3], [12, 1, 30, 2]):
            batch = _decode_batch(lens)
            planner.plan(*batch)
            if tensor_cores:
                assert wrapper._max_kv_len == max(lens)
            assert wrapper._batch_size == len(lens) and wrapper._paged_kv_indptr_buf is batch[4]
            info, pinned = _stock_decode_state(tail, tensor_cores, batch)
            assert wrapper._plan_info == info and torch.equal(wrapper._pin_memory_int_workspace_buffer, pinned)
    assert wrapper.stock_plans == 2 and module.calls[3:] == ["fast"] * 3
    assert _warnings(caplog) == []


def test_decode_fast_plan_of_another_release_keeps_stock_and_warns_once(flashinfer_version, caplog):
    """0.7.4's tensor-core decode passes a 21st argument; planned with 0.7.2.post1's 20 the fast plan
    raises: every plan stays stock, one warning names the version and the wrapper class."""
    flashinfer_version("0.7.2.post1")
    module = FakeModule(21)
    wrapper = FakeDecodeWrapper(module, use_tensor_cores=True, fa2_tail=TAIL_074)
    planner = _decode_planner(wrapper)
    other = _decode_planner(FakeDecodeWrapper(FakeModule(21), use_tensor_cores=True, fa2_tail=TAIL_074))
    with caplog.at_level(logging.INFO, logger="batchmeta"):
        for lens in ([5, 9, 1], [7, 20], [3]):
            planner.plan(*_decode_batch(lens))
            other.plan(*_decode_batch(lens))
    assert not planner.fast and not other.fast
    assert wrapper.stock_plans == 4 and module.calls == ["stock"] * 4  # the failed fast plan never reached it
    (message,) = _warnings(caplog)
    assert "0.7.2.post1" in message and "FakeDecodeWrapper" in message and "TypeError" in message


@pytest.mark.parametrize("drift", ["bytes", "info"])
def test_decode_fast_plan_that_differs_keeps_stock_and_warns_once(flashinfer_version, caplog, drift):
    flashinfer_version("0.7.4")
    module = FakeModule(15, drift=drift)
    wrapper = FakeDecodeWrapper(module)
    planner = _decode_planner(wrapper)
    with caplog.at_level(logging.INFO, logger="batchmeta"):
        planner.plan(*_decode_batch([5, 9, 1]))
        # The stock plan ran last: the wrapper holds its plan.
        assert module.calls == ["stock", "fast", "stock"] and wrapper._plan_info[0] > 0
        assert wrapper._paged_kv_indptr_buf is not None and wrapper._batch_size == 3
        planner.plan(*_decode_batch([2, 2]))
    assert not planner.fast and module.calls[3:] == ["stock"]
    (message,) = _warnings(caplog)
    assert "differs from the stock plan" in message and "0.7.4" in message and "FakeDecodeWrapper" in message
    assert ("plan info" in message) == (drift == "info") and ("int workspace" in message) == (drift == "bytes")


def test_decode_scalar_state_that_differs_keeps_stock(flashinfer_version, caplog):
    """A fast plan whose wrapper attributes differ from the stock plan's (here the longest KV length
    the tensor-core path sets) is not taken."""
    flashinfer_version("0.7.4")
    module = FakeModule(21)
    wrapper = FakeDecodeWrapper(module, use_tensor_cores=True, fa2_tail=TAIL_074)
    planner = _decode_planner(wrapper)
    indptr, last, lens, longest, *device = _decode_batch([5, 9, 1])
    with caplog.at_level(logging.INFO, logger="batchmeta"):
        planner.plan(indptr, last, lens, longest + 1, *device)
    assert not planner.fast
    (message,) = _warnings(caplog)
    assert "_max_kv_len" in message


def test_fast_plan_off_by_environment(flashinfer_version, monkeypatch, caplog):
    monkeypatch.setenv("BATCHMETA_FAST_PLAN", "0")
    flashinfer_version("0.7.4")
    assert not fast_plan.fast_plan_supported()
    module = FakeModule(15)
    wrapper = FakeDecodeWrapper(module)
    planner = _decode_planner(wrapper)
    with caplog.at_level(logging.INFO, logger="batchmeta"):
        for lens in ([5, 9, 1], [7, 20], [3]):
            planner.plan(*_decode_batch(lens))
    assert not planner.fast and module.calls == ["stock"] * 3 and wrapper.stock_plans == 3
    assert _warnings(caplog) == []


def test_unreadable_wrapper_keeps_stock_and_warns_once(flashinfer_version, caplog):
    """A wrapper lacking an attribute the path check reads (a FlashInfer whose wrapper changed)."""
    flashinfer_version("0.7.4")
    module = FakeModule(15)
    wrapper = FakeDecodeWrapper(module)
    del wrapper._uses_cudnn
    planner = _decode_planner(wrapper)
    with caplog.at_level(logging.INFO, logger="batchmeta"):
        for lens in ([5, 9, 1], [7, 20]):
            planner.plan(*_decode_batch(lens))
    assert not planner.fast and module.calls == ["stock"] * 2
    (message,) = _warnings(caplog)
    assert "cannot be checked" in message and "_uses_cudnn" in message


def _prefill_batch(qlens, clens, page_size=4):
    q = torch.tensor(qlens, dtype=torch.int32)
    seq = q + torch.tensor(clens, dtype=torch.int32)
    qo = torch.zeros(len(qlens) + 1, dtype=torch.int32)
    qo[1:] = torch.cumsum(q, 0)
    pages = (seq + page_size - 1) // page_size
    kv = torch.zeros(len(qlens) + 1, dtype=torch.int32)
    kv[1:] = torch.cumsum(pages, 0)
    last = (seq - 1) % page_size + 1
    indices = torch.arange(int(kv[-1]) + 3, dtype=torch.int32)
    return (
        qo,
        kv,
        last,
        seq,
        int(qo[-1]),
        int(q.max()),
        int(seq.max()),
        qo.clone(),
        kv.clone(),
        indices,
        last.clone(),
        int(kv[-1]),
    )


def _ragged_batch(qlens):
    q = torch.tensor(qlens, dtype=torch.int32)
    qo = torch.zeros(len(qlens) + 1, dtype=torch.int32)
    qo[1:] = torch.cumsum(q, 0)
    return qo, None, None, q, int(qo[-1]), int(q.max()), int(q.max()), qo.clone(), None, None, None, 0


def _prefill_planner(wrapper):
    return PrefillPlanner(
        wrapper,
        num_qo_heads=8,
        num_kv_heads=2,
        head_dim=64,
        page_size=4,
        window_left=-1,
        q_data_type=torch.float16,
        kv_data_type=torch.float16,
        ragged=wrapper.ragged,
    )


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize(("version", "tail"), [("0.7.2.post1", (-1, False, 0, 0)), ("0.7.4", (-1, False, 0, 0, False))])
def test_prefill_fast_plan_equal_to_stock_is_taken(flashinfer_version, caplog, ragged, version, tail):
    flashinfer_version(version)
    module = FakeModule(16 + len(tail))
    wrapper = FakePrefillWrapper(module, ragged=ragged, fa2_tail=tail)
    planner = _prefill_planner(wrapper)
    batches = [([5, 1, 3], [0, 7, 2]), ([9], [4]), ([1, 1, 16, 2], [3, 0, 0, 8])]
    with caplog.at_level(logging.INFO, logger="batchmeta"):
        for i, (qlens, clens) in enumerate(batches):
            batch = _ragged_batch(qlens) if ragged else _prefill_batch(qlens, clens)
            planner.plan(*batch)
            ref = FakePrefillWrapper(FakeModule(16 + len(tail)), ragged=ragged, fa2_tail=tail)
            _prefill_planner(ref).plan(*batch)  # a new planner's first plan: stock, then checked
            assert wrapper._plan_info == ref._plan_info, i
            assert torch.equal(wrapper._pin_memory_int_workspace_buffer, ref._pin_memory_int_workspace_buffer), i
            # The first batch's check ended with a stock plan (FlashInfer's copies); later ones are fast.
            assert wrapper._qo_indptr_last == sum(qlens) and (wrapper._qo_indptr_buf is batch[7]) == (i > 0)
            if not ragged:
                assert (wrapper._batch_size, wrapper._max_q_len, wrapper._max_kv_len) == (
                    ref._batch_size,
                    ref._max_q_len,
                    ref._max_kv_len,
                )
    assert planner.fast and wrapper.stock_plans == 2 and module.calls == ["stock", "fast", "stock", "fast", "fast"]
    assert _warnings(caplog) == []


def test_prefill_fast_plan_of_another_release_keeps_stock(flashinfer_version, caplog):
    """The crash this check replaces: 0.7.4's FA2 planner takes 21 arguments, 0.7.2.post1's call 20."""
    flashinfer_version("0.7.2.post1")
    module = FakeModule(21)
    wrapper = FakePrefillWrapper(module, fa2_tail=(-1, False, 0, 0, False))
    planner = _prefill_planner(wrapper)
    with caplog.at_level(logging.INFO, logger="batchmeta"):
        for qlens, clens in (([5, 1, 3], [0, 7, 2]), ([9], [4])):
            planner.plan(*_prefill_batch(qlens, clens))
    assert not planner.fast and module.calls == ["stock"] * 3
    (message,) = _warnings(caplog)
    assert "FakePrefillWrapper" in message and "0.7.2.post1" in message


@pytest.mark.parametrize(
    ("version", "release", "decode_tail", "prefill_tail"),
    [
        ("0.7.2.post1", "0.7.2.post1", (-1, False, 0, 0), (-1, False, 0, 4)),
        ("0.7.3", "0.7.2.post1", (-1, False, 0, 0), (-1, False, 0, 4)),  # not read: the check decides
        ("0.7.4", "0.7.4", (-1, False, 0, 1, True), (-1, False, 0, 4, False)),
    ],
)
def test_plan_conventions(flashinfer_version, version, release, decode_tail, prefill_tail):
    """What each release's plan() passes after window_left (decode.py and prefill.py, read)."""
    flashinfer_version(version)
    conventions = fast_plan.fast_plan_conventions()
    assert conventions.release == release
    assert conventions.decode_fa2_tail() == decode_tail
    assert conventions.prefill_fa2_tail(4) == prefill_tail


def test_older_flashinfer_has_no_fast_plans(flashinfer_version, caplog):
    flashinfer_version("0.6.3")
    with caplog.at_level(logging.INFO, logger="batchmeta"):
        assert not fast_plan.fast_plan_supported()
    (message,) = _warnings(caplog)
    assert "0.6.3" in message


MLA_TAIL = 16  # staged bytes a plan leaves unwritten (FlashInfer sizes each array for the most work items)


class FakeMLAModule:
    """The FA2 MLA backend's planning function: ``(plan info, staged int workspace bytes)``. It
    writes a digest of its arguments and leaves the last ``MLA_TAIL`` staged bytes as they were;
    ``fast`` = ``"drift"`` changes a byte the fast plan writes, ``"silent"`` writes none."""

    def __init__(self, fast: str = "same"):
        self.calls: list[str] = []
        self.owner = None
        self.fast = fast

    def plan_with_staged_workspace_bytes(self, *args):
        stock = self.owner._in_stock
        self.calls.append("stock" if stock else "fast")
        data = bytearray(repr(_digest(args[3:])).encode())
        if not stock and self.fast == "drift":
            data[3] ^= 1
        if stock or self.fast != "silent":
            args[2][: len(data)] = torch.frombuffer(data, dtype=torch.uint8)
        return [len(data), 7], len(data) + MLA_TAIL


class FakeMLAWrapper:
    """``BatchMLAPagedAttentionWrapper``'s plan() on FA2: a new backend per plan, as FlashInfer makes;
    with ``geometry`` (0.7.4) the backend records the planned query shape and page range."""

    def __init__(self, module: FakeMLAModule, backend_type: type, geometry: bool):
        module.owner = self
        self._module, self._backend_type, self._geometry = module, backend_type, geometry
        self._use_cuda_graph = False
        self._in_stock = False

    def plan(self, *, qo_indptr, kv_indptr, kv_indices, kv_len_arr, num_heads, head_dim_ckv, causal, **_):
        b = self._backend_type()
        b.device, b._cached_module, b._use_profiler, b._causal = torch.device("cpu"), self._module, False, causal
        b._float_workspace_buffer = torch.zeros(64, dtype=torch.uint8)
        b._int_workspace_buffer = torch.zeros(1024, dtype=torch.uint8)
        b._pin_memory_int_workspace_buffer = torch.randint(0, 256, (1024,), dtype=torch.uint8)  # uninitialised
        self._in_stock = True
        info, staged = self._module.plan_with_staged_workspace_bytes(
            b._float_workspace_buffer,
            b._int_workspace_buffer,
            b._pin_memory_int_workspace_buffer,
            qo_indptr,
            kv_indptr,
            kv_len_arr,
            num_heads,
            head_dim_ckv,
            causal,
        )
        self._in_stock = False
        b._kv_indices_buf = kv_indices.clone()
        if self._geometry:
            b._planned_query_shape = (int(qo_indptr[-1]), num_heads)
            b._planned_kv_page_range = (int(kv_indices.min()), int(kv_indices.max()) + 1)
        b._plan_info, b._staged_int_workspace_bytes = info, staged
        self._planned_backend, self._plan_info = b, info


@pytest.fixture
def fake_mla(flashinfer_version, monkeypatch):
    """Fake ``flashinfer.mla`` modules (the FA2 backend class, the workload check); returns the
    backend class."""
    from batchmeta.attention import mla

    backend_type = type("_BatchMLAPagedAttentionFa2Backend", (), {})
    backends = "flashinfer.mla._batch_mla._backends"
    names = [
        "flashinfer.mla",
        "flashinfer.mla._batch_mla",
        backends,
        f"{backends}._fa_common",
        f"{backends}.fa2_backend",
    ]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[3]]._validate_fa_plan_workload = lambda *args: None
    sys.modules[names[4]]._BatchMLAPagedAttentionFa2Backend = backend_type
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(multi_processor_count=132)
    )
    flashinfer_version("0.7.4")
    sys.modules["flashinfer"].mla = sys.modules["flashinfer.mla"]  # no MLAPlanMetadata: the keyword plan()
    mla._canonical_api.cache_clear()
    yield backend_type
    mla._canonical_api.cache_clear()


def _mla_batch(qlens, kv_lens, page_size=4):
    q, kv = torch.tensor(qlens, dtype=torch.int32), torch.tensor(kv_lens, dtype=torch.int32)
    qo, kvp = torch.zeros(len(qlens) + 1, dtype=torch.int32), torch.zeros(len(qlens) + 1, dtype=torch.int32)
    qo[1:], kvp[1:] = torch.cumsum(q, 0), torch.cumsum((kv + page_size - 1) // page_size, 0)
    return qo, kvp, kv, torch.arange(3, 3 + int(kvp[-1]), dtype=torch.int32), int(qo[-1])


def _mla_planner(wrapper):
    from batchmeta.attention.mla import MLAPlanner

    return MLAPlanner(
        wrapper,
        num_heads=16,
        head_dim_ckv=512,
        head_dim_kpe=64,
        page_size=4,
        sm_scale=0.1,
        q_data_type=torch.bfloat16,
        kv_data_type=torch.bfloat16,
    )


@pytest.mark.parametrize("geometry", [False, True])  # 0.7.2.post1's backend; 0.7.4's
def test_mla_fast_plan_equal_to_stock_is_taken(fake_mla, caplog, geometry):
    module = FakeMLAModule()
    wrapper = FakeMLAWrapper(module, fake_mla, geometry)
    planner = _mla_planner(wrapper)
    with caplog.at_level(logging.INFO, logger="batchmeta"):
        planner.plan(*_mla_batch([1, 1, 1], [30, 7, 19]))
        assert planner.fast and module.calls == ["stock", "fast", "fast", "stock"]
        page_range = getattr(wrapper._planned_backend, "_planned_kv_page_range", None)
        for qlens, kv_lens in (([3, 1], [40, 9]), ([1], [2])):
            batch = _mla_batch(qlens, kv_lens)
            planner.plan(*batch)
            ref = FakeMLAWrapper(FakeMLAModule(), fake_mla, geometry)
            _mla_planner(ref).plan(*batch)
            backend, stock = wrapper._planned_backend, ref._planned_backend
            assert wrapper._plan_info == ref._plan_info and backend._kv_indices_buf is batch[3]
            staged = stock._staged_int_workspace_bytes
            assert backend._staged_int_workspace_bytes == staged
            written = staged - MLA_TAIL
            assert torch.equal(
                backend._pin_memory_int_workspace_buffer[:written], stock._pin_memory_int_workspace_buffer[:written]
            )
            if geometry:  # the query shape run() checks; the page range stays the stock plan's
                assert backend._planned_query_shape == (sum(qlens), 16)
                assert backend._planned_kv_page_range == page_range
    assert module.calls[4:] == ["fast", "fast"]
    assert _warnings(caplog) == []


def test_mla_planned_query_shape_spans_graph_padding_rows(fake_mla, caplog, monkeypatch):
    """0.7.4's run() demands the planned query rows: a CUDA graph's queries span its padding rows
    (which carry no query tokens in qo_indptr), so stock and fast plans both record the caller's
    row count."""
    module = FakeMLAModule()
    wrapper = FakeMLAWrapper(module, fake_mla, geometry=True)
    planner = _mla_planner(wrapper)
    qo, kv, kv_len, indices, num_tokens = _mla_batch([1, 1, 1], [30, 7, 19])
    with caplog.at_level(logging.INFO, logger="batchmeta"):
        planner.plan(qo, kv, kv_len, indices, num_tokens + 5)  # 3 rows padded to 8
        assert planner.fast and wrapper._planned_backend._planned_query_shape == (8, 16)
        planner.plan(*_mla_batch([1], [2])[:4], 4)
    assert module.calls == ["stock", "fast", "fast", "stock", "fast"]
    assert wrapper._planned_backend._planned_query_shape == (4, 16)
    assert _warnings(caplog) == []
    monkeypatch.setenv("BATCHMETA_FAST_PLAN", "0")  # every plan the stock plan: the same shape
    fast_plan.fast_plan_conventions.cache_clear()
    stock_only = _mla_planner(FakeMLAWrapper(FakeMLAModule(), fake_mla, geometry=True))
    assert stock_only.plan(qo, kv, kv_len, indices, 8)._planned_backend._planned_query_shape == (8, 16)
    assert not stock_only.fast


@pytest.mark.parametrize("fast", ["drift", "silent"])
def test_mla_fast_plan_that_writes_other_bytes_keeps_stock(fake_mla, caplog, fast):
    """Only the staged bytes a plan writes are compared (the stock plan's buffer is new and its
    arrays' tails uninitialised): a changed byte differs, and so does a plan that wrote none."""
    module = FakeMLAModule(fast)
    wrapper = FakeMLAWrapper(module, fake_mla, geometry=True)
    planner = _mla_planner(wrapper)
    with caplog.at_level(logging.INFO, logger="batchmeta"):
        planner.plan(*_mla_batch([1, 1, 1], [30, 7, 19]))
        planner.plan(*_mla_batch([1], [2]))
    assert not planner.fast and module.calls == ["stock", "fast", "fast", "stock", "stock"]
    (message,) = _warnings(caplog)
    reason = "int workspace bytes" if fast == "drift" else "wrote no int workspace byte"
    assert reason in message and "FakeMLAWrapper" in message


@pytest.mark.parametrize("fast", ["1", "0"])
def test_stock_plans_leave_eager_wrappers_on_the_callers_device_arrays(flashinfer_version, monkeypatch, fast):
    """The stock plan copies the host arrays (upper bounds for rows whose lengths are on the
    device); after it an eager paged wrapper reads the caller's device arrays, as after a fast
    plan, and ``stock_planned`` says which plan ran."""
    monkeypatch.setenv("BATCHMETA_FAST_PLAN", fast)
    flashinfer_version("0.7.4")
    decode = _decode_planner(FakeDecodeWrapper(FakeModule(16 + len(TAIL_074)), True))
    prefill = PrefillPlanner(
        FakePrefillWrapper(FakeModule(21)),
        num_qo_heads=8,
        num_kv_heads=2,
        head_dim=64,
        page_size=4,
        window_left=-1,
        q_data_type=torch.float16,
        kv_data_type=torch.float16,
    )
    for step, lens in enumerate(([5, 9, 1], [7, 20])):
        batch = _decode_batch(lens)
        indptr, last, seq, max_len, dev_indptr, indices, dev_last = batch
        dev_indptr[1:] -= 1  # the device arrays differ from the host ones: only they may be read
        w = decode.plan(*batch)
        assert decode.stock_planned == (step == 0 or fast == "0")
        assert w._paged_kv_indptr_buf is dev_indptr and w._paged_kv_last_page_len_buf is dev_last
        assert w._paged_kv_indices_buf is indices
        qo = torch.arange(len(lens) + 1, dtype=torch.int32)
        w = prefill.plan(
            qo, indptr, last, seq, len(lens), 1, max_len, qo.clone(), dev_indptr, indices, dev_last, int(indptr[-1])
        )
        assert prefill.stock_planned == (step == 0 or fast == "0")
        assert w._paged_kv_indptr_buf is dev_indptr and w._paged_kv_last_page_len_buf is dev_last
        assert w._paged_kv_indices_buf is indices
    assert decode.fast == prefill.fast == (fast == "1")
