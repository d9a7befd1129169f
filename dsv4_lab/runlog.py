"""Run records (docs/methodology.md §2 "numbers come with the code and log that made them").

Every run directory holds `config.json` (model + train config), `env.json` (git commit, versions, device),
`metrics.jsonl` (one JSON object per logged step) and `ckpt.pt`. Writes are atomic (temp file + rename) so a
kill never leaves half a file; `metrics.jsonl` is appended line by line and trimmed back to the checkpoint on
resume, so a resumed run has exactly one record per step (a last line cut by a kill is dropped with a warning).

`ckpt.pt` is one header line `DSV4LAB-CKPT 1 sha256=<hex> bytes=<n>` followed by a `torch.save` payload that
holds only tensors, numbers, strings, lists and dicts; it is loaded with `torch.load(weights_only=True)`, so a
checkpoint received from someone else cannot run code. A damaged, truncated or foreign file raises `RunError`
naming it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


class RunError(ValueError):
    """A run directory or one of its files cannot be used; the message names the path and what to do."""


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


REPO_ROOT = Path(__file__).resolve().parents[1]


def save_json(obj, path) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def repo_relative(x, root: str | Path = REPO_ROOT):
    """x with every string that names a path inside the repository made relative to it (committed records, such as
    the figures' run records, name no machine path); dicts and lists walked, anything else returned as is."""
    prefix = str(root) + os.sep
    if isinstance(x, dict):
        return {k: repo_relative(v, root) for k, v in x.items()}
    if isinstance(x, list):
        return [repo_relative(v, root) for v in x]
    if isinstance(x, str) and x.startswith(prefix):
        return x[len(prefix):]
    return x


def load_json(path):
    with open(path) as fh:
        return json.load(fh)


def load_run_config(path) -> dict:
    """A run's config.json -> {"model": {...}, "train": {...}}; RunError naming the file if it is not one."""
    path = Path(path)
    try:
        d = load_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path} cannot be read as JSON ({_one_line(e)}); restore it or use another run_dir") from None
    if not (isinstance(d, dict) and isinstance(d.get("model"), dict) and isinstance(d.get("train"), dict)):
        raise RunError(f"{path} is not a dsv4-lab run config (an object with 'model' and 'train' objects); "
                       "restore it or use another run_dir")
    return d


def check_run_dir(run_dir, record: dict) -> bool:
    """Validate run_dir before anything is written; True if it holds this very run (resume or skip).

    Refused (RunError): a path that is a file or lies under one, an unwritable parent, a ckpt.pt or metrics.jsonl
    without config.json (their configuration is unknown), a damaged config.json, another run's config.json. A
    config.json alone (a run that stopped before its first record) is taken over by the new config."""
    p = Path(run_dir)
    if not str(run_dir).strip():
        raise RunError("run_dir is empty; give a directory, e.g. run_dir=runs/my_run")
    if p.exists() and not p.is_dir():
        raise RunError(f"run_dir {p} exists and is not a directory; use another run_dir")
    anc = p
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise RunError(f"run_dir {p} cannot be created: {anc} is a file, not a directory; use another run_dir")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise RunError(f"run_dir {p} cannot be written ({anc} is not writable); use another run_dir")
    cfg = p / "config.json"
    data = [f for f in ("ckpt.pt", "metrics.jsonl") if (p / f).exists()]
    if not cfg.exists():
        if data:
            raise RunError(f"run_dir {p} holds {' and '.join(data)} but no config.json, so the configuration they "
                           f"belong to is unknown; restore {cfg} or use another run_dir (or delete {p})")
        return False
    old = load_run_config(cfg)
    if not same_config(old, record):
        if not data:
            return False
        raise RunError(f"{p} holds a run with a different config; use another run_dir "
                       f"(differences: {'; '.join(config_diff(old, record))})")
    return True


# train fields that do not change a run: a moved run dir still resumes, a ddp checkpoint resumes under fsdp2, an
# eager run resumes graphed (a CUDA graph replays the eager step's kernels: tests/test_cuda_graph.py)
NOT_COMPARED = ("run_dir", "progress", "parallel", "cuda_graph")
# train fields newer than some records: absent = this (old) behaviour
ADDED_LATER = {"deterministic": False, "task_mrcr_queries": 1}


def same_config(a: dict, b: dict) -> bool:
    return not config_diff(a, b)


def config_diff(a: dict, b: dict, limit: int = 6) -> list[str]:
    """'section.key: old -> new' for the first `limit` fields that differ between two run configs."""
    b = json.loads(json.dumps(b, default=str))
    out = []
    for sec in ("model", "train"):
        sa, sb = a.get(sec, {}), b.get(sec, {})
        for k in sorted(set(sa) | set(sb)):
            d = ADDED_LATER.get(k) if sec == "train" else None
            if sa.get(k, d) != sb.get(k, d) and not (sec == "train" and k in NOT_COMPARED):
                out.append(f"{sec}.{k}: {sa.get(k)!r} -> {sb.get(k)!r}")
    return out[:limit]


# --------------------------------------------------------------------------------------------------------------
# checkpoints: header line with the payload's sha256, weights-only payload
# --------------------------------------------------------------------------------------------------------------

CKPT_MAGIC = b"DSV4LAB-CKPT 1"
_HEADER = re.compile(rb"DSV4LAB-CKPT 1 sha256=([0-9a-f]{64}) bytes=([0-9]+)\n")


def save_checkpoint(obj: dict, path) -> None:
    """Header + torch.save(obj) written atomically. obj must hold only weights_only-loadable values."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    header = CKPT_MAGIC + f" sha256={hashlib.sha256(payload).hexdigest()} bytes={len(payload)}\n".encode()
    atomic_write_bytes(path, header + payload)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Verify the header's size and sha256, then torch.load(weights_only=True). A file without the header (a
    plain torch.save from an earlier dsv4-lab) is still loaded weights-only, without a checksum to check."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RunError(f"checkpoint {path} cannot be read ({_one_line(e)})") from None
    what = "checkpoint"
    if data.startswith(CKPT_MAGIC):
        m = _HEADER.match(data[:200])
        if m is None:
            raise RunError(f"checkpoint {path} has a damaged header; delete it (the run restarts from step 0) "
                           "or use another run_dir")
        payload, want_sha, want_n = data[m.end():], m.group(1).decode(), int(m.group(2))
        if len(payload) != want_n:
            raise RunError(f"checkpoint {path} is truncated ({len(payload)} of {want_n} payload bytes); delete it "
                           "(the run restarts from step 0) or use another run_dir")
        if hashlib.sha256(payload).hexdigest() != want_sha:
            raise RunError(f"checkpoint {path} fails its sha256 check (the file is damaged); delete it "
                           "(the run restarts from step 0) or use another run_dir")
    else:
        payload, what = data, "checkpoint (no dsv4-lab header)"
    try:
        ck = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:                    # any unpickling / zip error: the file is not a loadable checkpoint
        first = _one_line(e).split(". ")[0][:120]
        raise RunError(f"{what} {path} cannot be loaded weights-only ({type(e).__name__}: {first}); delete it "
                       "(the run restarts from step 0) or use another run_dir") from None
    if not (isinstance(ck, dict) and isinstance(ck.get("model"), dict) and isinstance(ck.get("step"), int)):
        raise RunError(f"{what} {path} is not a dsv4-lab checkpoint (needs 'model' and 'step'); delete it or use "
                       "another run_dir")
    return ck


def _one_line(e) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _git(root: Path, *args, env: dict | None = None, timeout: float = 10) -> str | None:
    """stdout of `git args` in root, stripped; None when git is missing or the command fails."""
    try:
        r = subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except Exception:
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_commit(root: str | Path | None = None) -> dict:
    """{"commit": HEAD, "dirty": tracked files edited, "code_tree": code_tree()} of the repository at root."""
    root = Path(root or REPO_ROOT)
    return {"commit": _git(root, "rev-parse", "HEAD") or None,
            "dirty": bool(_git(root, "status", "--porcelain", "--untracked-files=no")),
            "code_tree": code_tree(root)}


def commit_label(root: str | Path | None = None, short: bool = False) -> str | None:
    """git_commit as one string for a record's "commit" field: HEAD (7 digits if short), "+dirty" when tracked files
    are edited; None without git."""
    g = git_commit(root)
    return (g["commit"][:7 if short else None] + ("+dirty" if g["dirty"] else "")) if g["commit"] else None


def code_tree(root: str | Path | None = None, path: str = "dsv4_lab") -> str | None:
    """The git tree hash of `path` as it is on disk (tracked and untracked files, edits included, ignored files
    not): equal to `git rev-parse C:dsv4_lab` for every commit C holding exactly this code. It names the code a record
    ran on where HEAD does not: a copy of a working tree with edits, such as the one a device machine runs (find the
    commit with `commits_with_code_tree`). None without git."""
    root = Path(root or REPO_ROOT)
    with tempfile.TemporaryDirectory() as d:                     # a scratch index: the repository's stays untouched
        env = {**os.environ, "GIT_INDEX_FILE": os.path.join(d, "index")}
        if _git(root, "add", "-A", "--", path, env=env, timeout=30) is None:
            return None
        tree = _git(root, "write-tree", env=env, timeout=30)
        return (_git(root, "rev-parse", f"{tree}:{path}") or None) if tree else None


def commits_with_code_tree(tree: str, root: str | Path | None = None, path: str = "dsv4_lab") -> list[str]:
    """Where a record's git.code_tree came from: HEAD if its `path` is that tree, and each commit that changed `path`
    to that tree (newest first)."""
    root = Path(root or REPO_ROOT)
    head, log = _git(root, "rev-parse", "HEAD"), _git(root, "log", "--format=%H", "--", path, timeout=60)
    if head is None or log is None:
        return []
    return [c for c in dict.fromkeys([head, *log.split()]) if _git(root, "rev-parse", f"{c}:{path}") == tree]


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
        """The records, in step order. A bad last line (cut by a kill) is dropped with a warning on stderr; a bad
        line before it, or steps out of order, raise RunError naming the file and line."""
        if not self.path.exists():
            return []
        try:
            lines = self.path.read_bytes().decode("utf-8", errors="replace").split("\n")
        except OSError as e:
            raise RunError(f"{self.path} cannot be read ({_one_line(e)})") from None
        numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
        out = []
        for j, (lineno, line) in enumerate(numbered):
            rec, why = _parse_record(line)
            if rec is not None and out and rec["step"] <= out[-1]["step"]:
                rec, why = None, f"step {rec['step']} after step {out[-1]['step']}"
            if rec is None:
                if j == len(numbered) - 1:
                    print(f"warning: {self.path}: dropped its last line {lineno} ({why}: cut by a kill?)",
                          file=sys.stderr)
                    break
                raise RunError(f"{self.path} line {lineno} is not a metrics record ({why}); the file is damaged: "
                               "delete the run_dir and rerun, or use another run_dir")
            out.append(rec)
        return out

    def truncate_after(self, step: int) -> None:
        """Keep only records with record['step'] <= step (used when resuming from a checkpoint)."""
        recs = [r for r in self.read() if r.get("step", -1) <= step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in recs).encode())


def _parse_record(line: str):
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None, "not JSON"
    if not isinstance(rec, dict) or type(rec.get("step")) is not int or rec["step"] < 0:
        return None, "not an object with an integer 'step' >= 0"
    return rec, ""


def read_metrics(run_dir) -> list[dict]:
    return MetricsLog(Path(run_dir) / "metrics.jsonl").read()


def read_csv(path) -> list[dict]:
    """Rows of a CSV file with a header as dicts of strings; [] when the file does not exist."""
    import csv
    path = Path(path)
    if not path.exists():
        return []
    with open(path) as fh:
        return list(csv.DictReader(fh))
