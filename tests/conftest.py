import random
import zlib

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_from_test_id(request):
    """Each test starts torch's and Python's global RNGs from a seed of its own id, so a test that draws
    unseeded random inputs sees the same ones whatever ran before it: alone, in a subset, or rerun by CI.
    (Under pytest-xdist, as the GPU runs use it, too: there the order of tests differs from run to run.)"""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
