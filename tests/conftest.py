"""Test-wide setup.

Triton kernels run through Triton's interpreter on machines without CUDA; the interpreter is chosen
when `@triton.jit` is applied, so the variable must be set before any kernel module is imported.

Each test starts from torch's generator seeded by its own id, so its random inputs do not depend on which
tests ran before it (a run of a subset, or another order, draws the same inputs). The KV-format and
attention tests promise fresh inputs on every run: they draw their seed from the OS and name it when
they fail.
"""
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords or "multigpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
