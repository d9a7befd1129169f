"""Execute every notebook in notebooks/ with papermill at its default (tiny, CPU) parameters.

The executed copies land in --out (default build/notebooks); `pytest --nbval-lax build/notebooks` then re-runs
them and compares the cells marked `# NBVAL_CHECK_OUTPUT` with these outputs. Sources stay output-free.

    python scripts/run_notebooks.py [--only 01 03] [--out build/notebooks] [-p key value ...]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import papermill as pm

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build/notebooks")
    ap.add_argument("--only", nargs="*", default=None, help="notebook name prefixes to run (default: all)")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="parameter override passed to papermill (value parsed as YAML)")
    a = ap.parse_args(argv)
    import yaml
    params = {k: yaml.safe_load(v) for k, v in a.p}
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    nbs = sorted((ROOT / "notebooks").glob("*.ipynb"))
    if a.only:
        nbs = [n for n in nbs if any(n.name.startswith(p) for p in a.only)]
    if not nbs:
        print("no notebooks selected", file=sys.stderr)
        return 1
    os.environ.setdefault("MPLBACKEND", "Agg")
    failed = []
    for nb in nbs:
        t0 = time.time()
        try:
            pm.execute_notebook(str(nb), str(out / nb.name), parameters=params, kernel_name="python3",
                                cwd=str(ROOT / "notebooks"), progress_bar=False)
            print(f"ran {nb.name} in {time.time() - t0:.1f}s", flush=True)
        except Exception as e:  # keep going so one report lists every broken notebook
            print(f"FAILED {nb.name} after {time.time() - t0:.1f}s: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            failed.append(nb.name)
    if failed:
        print(f"{len(failed)} notebook(s) failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
