import os

import pytest
import torch

# Intra-op threads, set once for the whole session: OMP_NUM_THREADS if given, else min(2, cores) (tests are sized
# for 2 cores). No test module changes it; subprocess workers set their own.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))
# Every kernel run under TRITON_INTERPRET=1 (the subprocess workers inherit this) is also lowered for an sm_90 GPU:
# the interpreter lets code pass that the GPU compiler rejects (dsv4_lab/kernels/compile_check.py).
os.environ.setdefault("DSV4_GPU_COMPILE_CHECK", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory):
    """Cache the byte corpus once per session in a temporary folder unless the user set one."""
    if "DSV4_DATA_CACHE" not in os.environ:
        os.environ["DSV4_DATA_CACHE"] = str(tmp_path_factory.mktemp("data_cache"))
    yield
