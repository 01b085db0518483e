"""Test setup.

Without CUDA, Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must be set before
anything imports batchmeta, because ``@triton.jit`` reads it when a kernel is defined. With CUDA the
same op tests run on the GPU with compiled kernels, and the ``gpu``-marked tests run too.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# The interpreter runs a kernel in milliseconds to seconds: few, small examples, no deadline.
settings.register_profile(
    "batchmeta",
    max_examples=int(os.environ.get("BATCHMETA_HYPOTHESIS_EXAMPLES", "50")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
settings.load_profile("batchmeta")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where op tests run: the GPU when there is one (compiled Triton), else the CPU (interpreter)."""
    # With an index, so it compares equal to a tensor's .device.
    return torch.device("cuda", torch.cuda.current_device()) if HAS_CUDA else torch.device("cpu")


@pytest.fixture(params=["triton", "torch"])
def backend(request) -> str:
    """Each op test runs through both implementations."""
    return request.param
