"""Every notebook, run as a reader runs it: JupyterLab in a real browser, Run > Run All Cells (`make test-lab`).

JupyterLab starts on a free port of 127.0.0.1 (random token) over a temporary copy of notebooks/*.ipynb with their
outputs cleared (so a committed figure cannot stand in for a missing one, and the UI never writes to the repo).
Debian's chromium (`/usr/bin/chromium`, or $CHROMIUM), driven by playwright with the system binary (never
`playwright install`), opens each notebook, clicks Run > Run All Cells, waits until no cell is queued and the kernel
is idle, then fails on any error or stderr output (a traceback, a warning box) and on any cell that draws
(`plt.show()`, `display(Image(...))`) but shows no <img>. Each notebook's time is printed.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
NOTEBOOK_TIMEOUT_S = int(os.environ.get("LAB_NOTEBOOK_TIMEOUT_S", 1200))   # a few minutes per notebook on 2 busy cores
SETTINGS = {                       # user settings of the throw-away lab (no network, nothing written back)
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},   # every cell in the DOM
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/extensionmanager-extension/plugin": {"enabled": False},
}

_spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
run_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebooks)
DRAWS = run_notebooks.DRAWS        # the same rule as the committed-notebook check


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A running JupyterLab over cleared copies of the notebooks -> (base url, token)."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"CHROMIUM={CHROMIUM} is not an executable: `make test-lab` installs Debian's chromium")
    work = tmp_path_factory.mktemp("lab")
    root = work / "notebooks"
    root.mkdir()
    for src in NOTEBOOKS:
        nb = nbformat.read(src, as_version=4)
        for c in nb.cells:
            if c.cell_type == "code":
                c.outputs, c.execution_count = [], None
        nbformat.write(nb, root / src.name)
    for name, values in SETTINGS.items():
        f = work / "settings" / (name + ".jupyterlab-settings")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(values))
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}           # the kernel's inline backend
    env.update(JUPYTER_CONFIG_DIR=str(work / "config"), JUPYTER_RUNTIME_DIR=str(work / "runtime"))
    log = open(work / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}",
         f"--IdentityProvider.token={token}", f"--LabApp.user_settings_dir={work / 'settings'}",
         f"--LabApp.workspaces_dir={work / 'workspaces'}", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() - t0 > 180:
            proc.kill()
            pytest.fail(f"JupyterLab did not start on port {port}: {(work / 'lab.log').read_text()[-3000:]}")
        time.sleep(0.5)
    print(f"\nJupyterLab up in {time.time() - t0:.1f}s on port {port}", flush=True)
    yield base, token
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=FLAGS, viewport={"width": 1400, "height": 1000})
        yield ctx
        ctx.close()


STATE_JS = """() => {
  const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook');
  if (!nb) return null;
  const ind = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');
  const cells = [...nb.querySelectorAll(':scope .jp-Cell.jp-CodeCell')];
  return {
    status: ind ? ind.getAttribute('data-status') : null,
    prompts: cells.map(c => (c.querySelector('.jp-InputPrompt') || {}).textContent || ''),
    images: cells.map(c => c.querySelectorAll('.jp-OutputArea-output img').length),
    errors: cells.map(c => [...c.querySelectorAll(
        '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')].map(e => e.textContent)),
  };
}"""


def _run_all(page, tries: int = 3):
    """Run > Run All Cells from the menu bar, as a reader does; clicked again if no cell got queued (a click that
    lands while the freshly opened lab is still settling is sometimes dropped)."""
    for attempt in range(tries):
        page.locator(".lm-MenuBar-itemLabel").filter(has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-itemLabel").filter(has_text=re.compile(r"^Run All Cells$")).click()
        try:
            page.wait_for_function(f"() => {{ const s = ({STATE_JS})(); "
                                   "return !!s && s.prompts.some(p => /[0-9*]/.test(p)); }", timeout=15_000)
            return
        except Exception:
            print(f"  Run All Cells queued nothing (try {attempt + 1} of {tries})", flush=True)
    pytest.fail(f"Run > Run All Cells queued no cell after {tries} tries")


def _wait(page, condition_js: str, timeout_s: float, what: str, shots: pathlib.Path):
    """Wait until condition_js (a JS function of the notebook state) holds; on a timeout fail with a screenshot.
    Polled in 30 s slices: one long wait_for_function (20 min) was seen to never return."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    deadline = time.time() + timeout_s
    while True:
        try:
            page.wait_for_function(f"() => {{ const s = ({STATE_JS})(); return !!s && ({condition_js})(s); }}",
                                   timeout=30_000, polling=500)
            return
        except PlaywrightTimeout:
            print(f"  still waiting for {what}: {page.evaluate(STATE_JS)}", flush=True)
            if time.time() > deadline:
                break
    shot = shots / f"timeout-{int(time.time())}.png"
    page.screenshot(path=str(shot))
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}; state {page.evaluate(STATE_JS)}; screenshot {shot}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_jupyterlab(lab, browser, path, tmp_path):
    base, token = lab
    src = nbformat.read(path, as_version=4)
    code = [c.source for c in src.cells if c.cell_type == "code"]
    page = browser.new_page()
    try:
        page.goto(f"{base}/lab/workspaces/{path.stem}/tree/{path.name}?reset&token={token}")
        _wait(page, f"s => s.prompts.length === {len(code)} && s.status === 'idle'", 180,
              "the notebook to open with an idle kernel", tmp_path)
        t0 = time.time()
        _run_all(page)
        # done when no cell is queued or running, the kernel is idle, and every cell ran or one failed
        _wait(page, "s => s.status === 'idle' && !s.prompts.some(p => p.includes('*')) && "
                    "(s.prompts.every(p => /[0-9]/.test(p)) || s.errors.some(e => e.length))",
              NOTEBOOK_TIMEOUT_S, "Run All Cells to finish", tmp_path)
        seconds = time.time() - t0
        state = page.evaluate(STATE_JS)
    finally:
        page.close()
    problems = [f"cell {i}: {e.strip()[:500]}" for i, es in enumerate(state["errors"]) for e in es]
    problems += [f"cell {i} never ran (prompt {p!r})" for i, p in enumerate(state["prompts"])
                 if not any(ch.isdigit() for ch in p)]
    problems += [f"cell {i} draws a figure but shows no <img>" for i, s in enumerate(code)
                 if DRAWS.search(s) and not state["images"][i]]
    print(f"\n{path.name}: Run All Cells took {seconds:.1f}s in JupyterLab, "
          f"{sum(map(bool, state['images']))} cells with figures", flush=True)
    assert not problems, f"{path.name} in JupyterLab (code cell index):\n" + "\n".join(problems)
