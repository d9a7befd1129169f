"""The metric each ablation question needs, computed from a run's records (metrics.jsonl) or, for the residual
maps, from the model at an evaluation step. Definitions are stated here once and used by summarize and the report.

Per-step train losses: every record of metrics.jsonl carries `losses`, the train loss of each step since the
previous record (train.py), so `step_losses(records)` rebuilds the full curve, one value per step.

Loss spike (stated definition): step t >= SPIKE_HISTORY is a spike when
    loss_t > SPIKE_FACTOR x median(loss_{t-SPIKE_HISTORY} .. loss_{t-1});
consecutive spike steps count as one spike (one event). `largest_jump` = max_t (loss_t - that median), in nats.
Diverged: any non-finite train loss, or the median of the last SPIKE_HISTORY losses above the first step's loss.
Anticipatory routing on (`anticipatory_on`): the fraction of the logged records in which any MoE layer routed with
the lagged router (its `*.anticipatory_active` = 1); with `anticipatory=auto` a 0 on a run means it never switched
on (an activation lasts anticipatory_period steps, no fewer than the log interval in the sweeps).
Composite-mapping gain (mHC paper's "Amax gain magnitude"): the residual maps of HC / mHC multiplied through
depth, M = P_L^T ... P_1^T (B, T, n, n); gain = max(largest absolute row sum, largest absolute column sum) of
M, max over the tokens of one validation sequence. 1 for plain residuals; mHC keeps it near 1 (doubly
stochastic factors), HC is unbounded.
"""
from __future__ import annotations

import math
import statistics

import torch

SPIKE_FACTOR = 1.2
SPIKE_HISTORY = 20


def step_losses(records: list[dict]) -> list[float]:
    """The train loss of every step, in order, from metrics.jsonl records (their `losses` lists)."""
    out: list[float] = []
    for r in records:
        out += [float(v) for v in r.get("losses", [])]
    return out


def _spike_scan(losses: list[float], factor: float, history: int) -> tuple[list[int], float]:
    """(the step where each spike event starts, the largest jump above the running median)."""
    starts, largest, in_spike = [], 0.0, False
    for t in range(history, len(losses)):
        med = statistics.median(losses[t - history:t])
        jump = losses[t] - med
        if math.isfinite(jump):
            largest = max(largest, jump)
        is_spike = not math.isfinite(losses[t]) or losses[t] > factor * med
        if is_spike and not in_spike:
            starts.append(t)
        in_spike = is_spike
    return starts, largest


def spikes(losses: list[float], factor: float = SPIKE_FACTOR, history: int = SPIKE_HISTORY) -> dict:
    """Spike count (events) and the largest jump above the running median, per the definition above."""
    starts, largest = _spike_scan(losses, factor, history)
    return {"spike_count": len(starts), "largest_jump": largest}


def spike_starts(losses: list[float], factor: float = SPIKE_FACTOR, history: int = SPIKE_HISTORY) -> list[int]:
    """The step at which each spike event starts (same definition as `spikes`)."""
    return _spike_scan(losses, factor, history)[0]


def shared_spikes(starts: list[int], other: list[int], tol: int = 1) -> float | None:
    """Fraction of the spike events `starts` that start within `tol` steps of an event of `other` (None: no
    event). Two runs with the same seed see the same batches in the same order: a high fraction between arms of
    one seed, against a low one between seeds, says the spikes follow the data, not the arm (data-locked)."""
    if not starts:
        return None
    return sum(any(abs(t - u) <= tol for u in other) for t in starts) / len(starts)


def diverged(losses: list[float], history: int = SPIKE_HISTORY) -> bool:
    if not losses:
        return False
    if not all(math.isfinite(v) for v in losses):
        return True
    return len(losses) > history and statistics.median(losses[-history:]) > losses[0]


@torch.no_grad()
def composite_mapping_gain(model: torch.nn.Module, x: torch.Tensor, amp=None) -> float | None:
    """Amax gain of the residual maps through depth on input x (1, T); None when the model has no HC / mHC."""
    from .mhc import HyperConnection, mixing_probes, set_probe
    if not any(isinstance(m, HyperConnection) for m in model.modules()):
        return None
    set_probe(model, True)
    try:
        if amp is not None:
            with amp():
                model(x)
        else:
            model(x)
        probes = mixing_probes(model)
    finally:
        set_probe(model, False)
    return amax_gain([p["P"] for p in probes])


def amax_gain(maps: list[torch.Tensor]) -> float:
    """maps: residual maps P (B, T, n, n) in forward order; the layer update is x' = P^T x. Returns the max over
    tokens of max(largest |row sum|, largest |column sum|) of M = P_L^T ... P_1^T, computed in fp64."""
    M = None
    for P in maps:
        Pt = P.transpose(-1, -2).double()
        M = Pt if M is None else Pt @ M
    rows = M.sum(-1).abs().amax(-1)                # (B, T)
    cols = M.sum(-2).abs().amax(-1)
    return float(torch.maximum(rows, cols).max())


def run_metrics(records: list[dict]) -> dict:
    """Scalar metrics of one finished run: the last record's values (val_loss, val_answer_acc_near/far, time_s,
    ...), plus stability over the whole run from the per-step losses and the per-record gradient norms."""
    if not records:
        return {}
    last = records[-1]
    out = {k: float(v) for k, v in last.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "lr")}
    losses = step_losses(records)
    if losses:
        out.update(spikes(losses))
        out["diverged"] = float(diverged(losses))
        out["final_train_loss"] = statistics.mean(losses[-SPIKE_HISTORY:])
    gn = [r["grad_norm_max"] for r in records if "grad_norm_max" in r]
    if gn:
        out["max_grad_norm"] = max(gn)
    on = [max(v for k, v in r.items() if k.endswith("anticipatory_active")) for r in records
          if any(k.endswith("anticipatory_active") for k in r)]
    if on:
        out["anticipatory_on"] = sum(a > 0 for a in on) / len(on)
    gains = [r["hc_composite_gain"] for r in records if "hc_composite_gain" in r]
    if gains:
        out["hc_composite_gain_max"] = max(gains)
    return out
