import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_model_triton_path_equals_torch_path_under_interpreter():
    """kernels="triton" routes SWA / CSA / HCA core attention (and the CSA indexer top-k and, with
    indexer_loss_weight > 0, the sparse-stage indexer KL) through the Triton kernels (run by the interpreter on CPU);
    logits and gradients equal the reference path; a storage="paper" decode that hands the indexer keys to the
    Triton top-k packed (MXFP4) gives the logits of the unpacked reads bit for bit. A subprocess, because
    TRITON_INTERPRET must be set before triton compiles anything."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(HERE / "kernel_wiring_check.py")], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "kernel calls {'csa': 4, 'hca': 2, 'indexer': 2, 'kl': 1}" in r.stdout
    assert "3 packed key reads, 3 Triton top-k calls, logits equal to the unpacked reads' True" in r.stdout
