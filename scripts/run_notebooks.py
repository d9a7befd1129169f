"""Execute the notebooks at their CI setting and write them back WITH their outputs (the committed, web-readable copy).

    python scripts/run_notebooks.py                   # every notebooks/*.ipynb, in place (`make notebooks`)
    python scripts/run_notebooks.py --only 03 07      # the notebooks whose names start with 03 or 07
    python scripts/run_notebooks.py --check           # no execution: are the committed copies executed and clean?
    python scripts/run_notebooks.py --only 01 --out build/nb -p steps 400   # another setting (papermill), into --out

In place, a notebook runs at the defaults of its `parameters` cell (the CI setting) top to bottom in a fresh kernel
whose working directory is notebooks/; the thread count comes from the environment (OMP_NUM_THREADS), matplotlib
uses the inline backend so every figure is kept as a PNG output. A notebook is written back only if every cell ran
and the outputs pass `check` (no error, no warning or other stderr text, no stray `<object ...>` value, a figure
wherever a cell draws one). `pytest --nbval-lax notebooks/` (in `make test`) then re-runs the committed notebooks
and compares the cells marked `# NBVAL_CHECK_OUTPUT` with these committed outputs.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import time

import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
INLINE = "module://matplotlib_inline.backend_inline"
DRAWS = re.compile(r"plt\.show\(\)|display\(Image\(")          # a cell with one of these must hold an image output
STRAY = re.compile(r"^<[\w.]+ (object )?at 0x[0-9a-f]+>$|^<torch\._C\.Generator")   # a value nobody meant to show


def check(nb, name: str) -> list[str]:
    """Problems of an executed notebook's outputs (empty = clean)."""
    problems = []
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    if counts != list(range(1, len(code) + 1)):
        problems.append(f"{name}: not executed top to bottom in one kernel (execution counts {counts})")
    for i, c in enumerate(nb.cells):
        if c.cell_type != "code":
            continue
        where = f"{name} cell {i}"
        for o in c.get("outputs", []):
            if o.output_type == "error":
                problems.append(f"{where}: error {o.ename}: {o.evalue}")
            elif o.output_type == "stream" and o.name == "stderr":
                problems.append(f"{where}: stderr output {o.text.strip()[:300]!r}")
            elif o.output_type == "execute_result" and STRAY.match(o.data.get("text/plain", "")):
                problems.append(f"{where}: stray value {o.data['text/plain'][:100]!r} (end the line with ';')")
        if DRAWS.search(c.source) and not any("image/png" in o.get("data", {}) for o in c.get("outputs", [])):
            problems.append(f"{where}: draws a figure but holds no image/png output (non-inline backend?)")
    return problems


def execute_in_place(path: pathlib.Path, timeout: int) -> list[str]:
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    for c in nb.cells:                       # a clean start: nothing of a previous run survives
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
            c.metadata.pop("execution", None)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(NB_DIR)}})
    client.execute()
    problems = check(nb, path.name)
    if not problems:
        nbformat.validate(nb)
        tmp = path.with_suffix(".ipynb.tmp")
        nbformat.write(nb, tmp)
        os.replace(tmp, path)                # nothing half-written
    return problems


def execute_with_parameters(path: pathlib.Path, out: pathlib.Path, params: dict, timeout: int) -> list[str]:
    import papermill as pm
    out.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(path), str(out / path.name), parameters=params, kernel_name="python3",
                        cwd=str(NB_DIR), progress_bar=False, execution_timeout=timeout)
    return check(nbformat.read(out / path.name, as_version=4), path.name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="notebook name prefixes (default: every notebook)")
    ap.add_argument("--check", action="store_true", help="only check the committed outputs, execute nothing")
    ap.add_argument("--out", default=None, help="with -p: folder for the executed copies (the sources stay as they are)")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="parameter override passed to papermill (value parsed as YAML); needs --out")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    a = ap.parse_args(argv)
    import yaml
    params = {k: yaml.safe_load(v) for k, v in a.p}
    if params and not a.out:
        print("run_notebooks: -p needs --out DIR (the committed notebooks are executed at their CI defaults only)",
              file=sys.stderr)
        return 2
    nbs = sorted(NB_DIR.glob("*.ipynb"))
    if a.only:
        nbs = [n for n in nbs if any(n.name.startswith(p) for p in a.only)]
    if not nbs:
        print(f"run_notebooks: no notebook in {NB_DIR} matches --only {a.only}", file=sys.stderr)
        return 2
    if a.check:
        problems = [p for nb in nbs for p in check(nbformat.read(nb, as_version=4), nb.name)]
        print("\n".join(problems) or f"{len(nbs)} committed notebooks executed and clean")
        return 1 if problems else 0
    os.environ["MPLBACKEND"] = INLINE       # the kernel inherits it: figures stay in the notebook
    failed = []
    for nb in nbs:
        t0 = time.time()
        try:
            if a.out:
                problems = execute_with_parameters(nb, pathlib.Path(a.out), params, a.timeout)
            else:
                problems = execute_in_place(nb, a.timeout)
        except Exception as e:               # keep going so that one report lists every broken notebook
            problems = [f"{nb.name}: {type(e).__name__}: {str(e)[-2000:]}"]
        status = "FAILED" if problems else ("ran" if a.out else "ran and wrote")
        print(f"{status} {nb.name} in {time.time() - t0:.1f}s", flush=True)
        for p in problems:
            print("  " + p, flush=True)
        failed += [nb.name] if problems else []
    if failed:
        print(f"{len(failed)} notebook(s) failed (not written): {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
