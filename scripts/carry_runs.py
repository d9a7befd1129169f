"""Carry unfinished training runs (with their checkpoints) from one machine to the next, in parts of bounded size.

A run cut short by the end of a device call keeps its checkpoint only on that machine; the next call starts on a
fresh one. `out` packs every unfinished run dir under ROOT (a `ckpt.pt` and a `config.json`, but fewer steps in
`metrics.jsonl` than the config's `max_steps`, and no `diverged.json`) into one tar.gz split into parts of at most
--part-mib MiB (a tool that brings files back may cap their size); `in` reassembles the parts and unpacks them under
DEST, never over a run dir that exists. Finished runs are not carried: their records travel without checkpoints
(ablations/run_gpu_tier.sh archive, dsv4_lab/longctx.py).

    python scripts/carry_runs.py out runs $OUT/carry --part-mib 15      # on the machine that ran them
    python scripts/carry_runs.py in <fetched>/carry runs                # here, then send runs/ with the next call
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv4_lab.sweep import is_diverged, is_finished  # noqa: E402

PART = "runs.tgz.part"
MANIFEST = "CARRY_RUNS.json"                     # the list of run dirs in the archive


def unfinished(root: Path) -> list[Path]:
    """Run dirs under root that hold a checkpoint of a run that has not reached its last step (dsv4_lab.sweep's
    is_finished / is_diverged decide)."""
    out = []
    for ck in sorted(root.rglob("ckpt.pt")):
        rd = ck.parent
        if not (rd / "config.json").exists() or is_diverged(rd):
            continue
        if not is_finished(rd, json.loads((rd / "config.json").read_text())["train"]["max_steps"]):
            out.append(rd)
    return out


def pack(root: Path, dest: Path, part_mib: float) -> list[Path]:
    runs = unfinished(root)
    if not runs:
        return []
    buf = io.BytesIO()
    names = [str(rd.relative_to(root)) for rd in runs]
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        manifest = json.dumps(names).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
        for rd, name in zip(runs, names):
            tar.add(rd, arcname=name)
    data, size = buf.getvalue(), int(part_mib * 2**20)
    dest.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, len(data), size):
        p = dest / f"{PART}{i // size:02d}"
        tmp = p.with_suffix(".tmp")
        tmp.write_bytes(data[i:i + size])
        tmp.replace(p)
        parts.append(p)
    return parts


def unpack(src: Path, dest: Path) -> list[str]:
    parts = sorted(src.glob(f"{PART}*"))
    if not parts:
        return []
    data = b"".join(p.read_bytes() for p in parts)
    placed = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = json.loads(tar.extractfile(MANIFEST).read())
        members = [m for m in tar.getmembers() if m.isfile() and m.name != MANIFEST]
        for name in names:                                # one run dir each; never over an existing one
            if (dest / name).exists():
                continue
            tmp = dest / (name + ".carry-tmp")            # whole run dir or nothing
            for m in members:
                rel = Path(m.name).relative_to(name) if Path(m.name).is_relative_to(name) else None
                if rel is not None and ".." not in rel.parts:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    (tmp / rel).write_bytes(tar.extractfile(m).read())
            tmp.replace(dest / name)
            placed.append(name)
    return placed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("out", help="pack the unfinished runs under ROOT into parts in DEST")
    o.add_argument("root")
    o.add_argument("dest")
    o.add_argument("--part-mib", type=float, default=15.0)
    i = sub.add_parser("in", help="unpack the parts in SRC under DEST")
    i.add_argument("src")
    i.add_argument("dest")
    a = ap.parse_args(argv)
    if a.cmd == "out":
        root = Path(a.root)
        if not root.is_dir():
            print(f"carry_runs: ROOT {root} is not a directory", file=sys.stderr)
            return 2
        if not a.part_mib > 0:
            print(f"carry_runs: --part-mib {a.part_mib} is not allowed: a positive number", file=sys.stderr)
            return 2
        parts = pack(root, Path(a.dest), a.part_mib)
        total = sum(p.stat().st_size for p in parts)
        print(f"carry_runs: {len(unfinished(root))} unfinished runs -> {len(parts)} parts, {total / 2**20:.1f} MiB "
              f"in {a.dest}")
        return 0
    src = Path(a.src)
    if not src.is_dir():
        print(f"carry_runs: SRC {src} is not a directory", file=sys.stderr)
        return 2
    placed = unpack(src, Path(a.dest))
    print(f"carry_runs: {len(placed)} run dirs placed under {a.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
