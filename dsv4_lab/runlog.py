"""Run records (docs/methodology.md §2 "numbers come with the code and log that made them").

Every run directory holds `config.json` (model + train config), `env.json` (git commit, versions, device),
`metrics.jsonl` (one JSON object per logged step) and `ckpt.pt`. Writes are atomic (temp file + rename) so a
kill never leaves half a file; `metrics.jsonl` is appended line by line and trimmed back to the checkpoint on
resume, so a resumed run has exactly one record per step.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_json(obj, path) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def load_json(path):
    with open(path) as fh:
        return json.load(fh)


def save_torch(obj, path) -> None:
    """torch.save through a temporary file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def git_commit(root: str | Path | None = None) -> dict:
    root = Path(root or Path(__file__).resolve().parents[1])
    def run(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""
    return {"commit": run("rev-parse", "HEAD") or None, "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}


def environment(device: str | torch.device = "cpu") -> dict:
    env = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    try:
        import numpy
        env["numpy"] = numpy.__version__
    except Exception:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


class MetricsLog:
    """Append-only JSONL of per-step metrics."""

    def __init__(self, path):
        self.path = Path(path)

    def append(self, rec: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec, default=float) + "\n")
            fh.flush()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:       # a line cut by a kill
                pass
        return out

    def truncate_after(self, step: int) -> None:
        """Keep only records with record['step'] <= step (used when resuming from a checkpoint)."""
        recs = [r for r in self.read() if r.get("step", -1) <= step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in recs).encode())


def read_metrics(run_dir) -> list[dict]:
    return MetricsLog(Path(run_dir) / "metrics.jsonl").read()
