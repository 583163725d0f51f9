import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="session")
def _threads():
    """Benchmarks run on every core torch uses (2 here) unless FASTCONV_BENCH_THREADS says."""
    import os
    n = int(os.environ.get("FASTCONV_BENCH_THREADS", torch.get_num_threads()))
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    yield n
    torch.set_num_threads(previous)
