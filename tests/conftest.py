import os

import torch

# Triton kernels run through the interpreter where there is no GPU. This must be set before
# any kernel module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import prhs_compile  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_compiler_state():
    """Each test compiles from scratch and starts with no selection state or stats.

    All HF models share a few code objects (their forward wrappers), so without a reset
    Dynamo's per-code recompile limit would be hit after a handful of tests.
    """
    torch._dynamo.reset()
    prhs_compile.clear_states()
    prhs_compile.reset_stats()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
