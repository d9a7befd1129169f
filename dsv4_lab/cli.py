"""Command line: `python -m dsv4_lab <command> key=value ...` (also the `dsv4-lab` console script).

    train      preset=tiny max_steps=40 run_dir=runs/x seed=1 lr=3e-3 layer_types=csa,hca ...
    reproduce  the lab's main job at CPU defaults: train the tiny arms, write runs/, regenerate figures/
    figures    regenerate figures/ from the saved run records only
    sweep      ablations/<name>.json [--scale cpu|gpu] [--jobs N] [--dry-run]: every arm x seed of an ablation
    summarize  [runs_root ...]: rebuild ablations/results/{summary,verdicts}.csv from run records, print verdicts
    longctx    run|collect|figure: long-context quality vs context length (dsv4_lab/longctx.py)
    config     print the resolved config of the given overrides as JSON
"""
from __future__ import annotations

import json
import sys

from .config import ConfigError, parse_overrides
from .runlog import RunError

EXPECTED_ERRORS = (ConfigError, RunError)   # bad input: one line on stderr, exit 2; anything else is a bug


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "train":
            mc, tc = parse_overrides(rest)
            from .train import train
            last = train(mc, tc)
            if last:                                   # other DDP ranks return {}: rank 0 prints the result
                print(json.dumps(last))
            _exit_distributed()
            return 0
        if cmd == "config":
            mc, tc = parse_overrides(rest)
            print(json.dumps({"model": mc.to_dict(), "train": tc.to_dict()}, indent=2))
            return 0
        if cmd == "reproduce":
            from .reproduce import reproduce
            return reproduce(rest)
        if cmd == "sweep":
            from .sweep import run_sweep_cli
            return run_sweep_cli(rest)
        if cmd == "longctx":
            from .longctx import longctx_cli
            return longctx_cli(rest)
        if cmd == "summarize":
            from .summarize import summarize_cli
            return summarize_cli(rest)
        if cmd == "figures":
            from pathlib import Path

            from .reproduce import make_figures
            if len(rest) > 1 or (rest and not Path(rest[0]).is_dir()):
                raise ConfigError(f"figures takes one existing runs directory (default runs), got {rest}")
            make_figures(rest[0] if rest else "runs", "figures")
            return 0
    except EXPECTED_ERRORS as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(f"error: unknown command {cmd!r}; commands: train, sweep, summarize, longctx, reproduce, figures, config", file=sys.stderr)
    return 2


def _exit_distributed():
    """Under torchrun, leave at once after the process group is destroyed: avoids a known abort at interpreter
    shutdown ("terminate called without an active exception", docs/toolchain.md)."""
    import os
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
