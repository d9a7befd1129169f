"""figures/efficiency_measured.png: the paper's teaser measured on the lab's own model (`small` V4 vs `small-dense`,
benchmarks/bench_efficiency.py on one GPU), beside the analytic curves of dsv4_lab.accounting for the same configs.
Drawn from the committed JSON; no GPU needed.

    from dsv4_lab.figures.efficiency_measured import plot_efficiency_measured
    plot_efficiency_measured("benchmarks/results/efficiency_measured.json", "figures")
    # -> [efficiency_measured.png, .csv, .md]; [] and one line on stdout when the JSON is absent

Panels (log-x context): training tokens/s; training peak memory; prefill seconds (cached prefill through the
inference API, and the no-cache forward on the training kernels); decode ms per token (filled marker: after a real
prefill; open: on a cache filled synthetically to that length); KV-cache bytes measured (markers) against
`accounting.kv_cache_bytes` with compressor states, in the storage of the decode runs (circles, solid) and in the
paper's FP8 / FP4 storage (squares, dotted); the V4 / dense cost per token measured (markers) against the analytic
FLOPs-per-token ratio (lines), which is the time ratio the accounting predicts if both arms ran at the same FLOP/s.

Analytic FLOPs per token (plain weighting, docs §A.2): training = 3 x forward = 3 x prefill_flops(n) / n; forward and
prefill = prefill_flops(n) / n; decode = decode_flops(n). The CSV has, per measured point, the measured seconds per
token, the analytic FLOPs per token and the achieved TFLOP/s (their quotient); per context the measured and analytic
V4 / dense ratios and their quotient; per KV point measured / analytic bytes.

Where measurement and accounting differ, and why (also in the .md written beside the figure):
* The accounting counts matrix FLOPs (2 per active parameter, QK and PV over the attended entries, indexer scores);
  it leaves out norms, RoPE, softmax, compressor pooling, the mHC mixing and Sinkhorn (4 residual streams), routing
  and top-k. At lab width (d = 384) these memory-bound ops are a large share of a step, and V4 has many more of them
  than the dense model: measured V4 / dense sits above the FLOPs ratio.
* Training: V4 also trains its MTP block and the indexer KL loss, which the FLOPs do not count; the dense arm runs
  compiled SDPA flash attention near peak, V4 its Triton sparse kernels eagerly (settings in the JSON).
* Decode at batch 1 is launch- and latency-bound: hundreds of small kernels per token, whatever the FLOPs. On CUDA
  (kernels="auto") the cached step runs the split-KV decode kernels (docs/kernels.md §8.4): SWA attends its window,
  CSA the window and its top-k picks gathered by index, HCA every visible entry; dense layers run SDPA over every
  stored token. Besides HCA's n/m' entries and the indexer's n/m scores (both in the accounting), the step grows
  with what the accounting leaves out: each layer reads all it stores back from the cache in PyTorch (window ring,
  every compressed entry, CSA's indexer keys; `LayerCache.window_keys` / `append_entries`, docs §6.2), so V4's
  decode cost follows the stored entries, not only k.
* The cached prefill, chunk by chunk, runs the query-major Triton kernels of the no-cache forward: CSA attends
  window + k per query; dense attention (SDPA with an explicit mask after the first chunk), HCA and the indexer's
  scores are quadratic in context as in that forward; each chunk adds the read-back of every stored entry. At this
  width a chunk is launch-bound (hundreds of small kernels per layer), so V4's prefill time grows with the number of
  chunks rather than with what each chunk attends to, and the no-cache forward of the same sequence is much faster.
* KV bytes agree with the accounting up to the cache's allocation granularity: whole blocks of lcm(m, m') tokens,
  the window ring in full, fp32 compressor states (counted by include_state=True), and the cache's int64 bookkeeping
  (block table, token ids: 8 B per block or token, not counted; the CSV notes `cache.nbytes()` / accounting too).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .. import accounting as acc
from ..config import ModelConfig

KINDS = ("kv", "kv_paper", "train", "forward", "prefill", "decode")
KV_KINDS = ("kv", "kv_paper")
ARMS = ("v4", "dense")
STATUSES = ("ok", "error", "skipped")
COLORS = {"v4": "C0", "dense": "C1"}
LABELS = {"v4": "V4", "dense": "dense"}
KIND_STYLE = {"train": ("o", "C2"), "forward": ("s", "C3"), "prefill": ("^", "C4"), "decode": ("D", "C5")}
REQUIRED = {"train": ("tokens_per_s",), "forward": ("forward_s",), "prefill": ("prefill_s",),
            "decode": ("ms_per_token",), "kv": ("bytes_tensors",), "kv_paper": ("bytes_tensors",)}
WHY = __doc__[__doc__.index("Where measurement"):].strip()


class MeasuredError(ValueError):
    """The measured JSON cannot be used; the message names the file, the field, the value and what is allowed."""


# --------------------------------------------------------------------------------------------------------------
# loading and validation
# --------------------------------------------------------------------------------------------------------------

def _bad(path, field: str, value, allowed: str) -> MeasuredError:
    v = repr(value)
    return MeasuredError(f"{path}: {field} = {v[:80] + '...' if len(v) > 80 else v} is not allowed: {allowed}")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def load_measured(path) -> dict:
    """The bench_efficiency JSON, validated: {"configs": {arm: ModelConfig}, "points": [...], "settings", "env"}.
    Only the fields the figure reads are checked; anything else is carried along."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MeasuredError(f"{path}: cannot be read as JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(d, dict):
        raise _bad(path, "(top level)", type(d).__name__, "a JSON object")
    if d.get("format") != 1:
        raise _bad(path, "format", d.get("format"), "1")
    for k in ("settings", "configs", "points"):
        if not isinstance(d.get(k), dict):
            raise _bad(path, k, d.get(k), "an object")
    configs = {}
    for arm in ARMS:
        if not isinstance(d["configs"].get(arm), dict):
            raise _bad(path, f"configs.{arm}", d["configs"].get(arm), "the arm's ModelConfig as an object")
        known = {k: v for k, v in d["configs"][arm].items() if k in ModelConfig.__dataclass_fields__}
        try:                                                             # fields added / dropped since: defaults
            configs[arm] = ModelConfig.from_dict(known)
        except (ValueError, TypeError) as e:
            raise MeasuredError(f"{path}: configs.{arm} is not a valid ModelConfig ({e})") from None
    points = []
    for key, p in d["points"].items():
        parts = key.split("/")
        where = f"points[{key!r}]"
        if len(parts) != 3 or parts[0] not in ARMS or parts[1] not in KINDS or not parts[2].isdigit():
            raise _bad(path, f"points key {key!r}", key, f"'ARM/KIND/CTX' with ARM in {ARMS}, KIND in {KINDS}")
        if not isinstance(p, dict):
            raise _bad(path, where, p, "an object")
        if p.get("status") not in STATUSES:
            raise _bad(path, f"{where}.status", p.get("status"), f"one of {STATUSES}")
        if p.get("status") == "ok":
            for f in REQUIRED[parts[1]]:
                if not _positive(p.get(f)):
                    raise _bad(path, f"{where}.{f}", p.get(f), "a positive finite number")
            if parts[1] == "train" and p.get("peak_mem_gb") is not None and not _positive(p["peak_mem_gb"]):
                raise _bad(path, f"{where}.peak_mem_gb", p["peak_mem_gb"], "a positive number or null")
            if parts[1] == "decode" and p.get("cache_fill") not in ("prefill", "synthetic"):
                raise _bad(path, f"{where}.cache_fill", p.get("cache_fill"), "'prefill' or 'synthetic'")
            if parts[1] in KV_KINDS and p.get("storage") not in acc.STORAGES:
                raise _bad(path, f"{where}.storage", p.get("storage"), f"one of {acc.STORAGES}")
        points.append({**p, "arm": parts[0], "kind": parts[1], "ctx": int(parts[2])})
    return {"configs": configs, "points": points, "settings": d["settings"], "env": d.get("env", {}),
            "calls": d.get("calls") or [d.get("env", {})], "path": str(path)}


# --------------------------------------------------------------------------------------------------------------
# measured vs analytic
# --------------------------------------------------------------------------------------------------------------

def seconds_per_token(p: dict) -> float:
    return {"train": lambda: 1.0 / p["tokens_per_s"], "forward": lambda: p["forward_s"] / p["ctx"],
            "prefill": lambda: p["prefill_s"] / p["ctx"], "decode": lambda: p["ms_per_token"] / 1e3}[p["kind"]]()


def flops_per_token(cfg: ModelConfig, kind: str, n: int) -> float:
    """Analytic plain FLOPs per token (docs §A.2): decode = decode_flops(n); forward / prefill = prefill_flops(n) / n;
    training = 3 x that (backward = 2 x forward)."""
    if kind == "decode":
        return float(acc.decode_flops(cfg, n, "plain"))
    return (3.0 if kind == "train" else 1.0) * acc.prefill_flops(cfg, n, "plain") / n


def compare(m: dict) -> list[dict]:
    """Rows of the CSV: 'cost' per measured point, 'v4/dense' per (kind, ctx) with both arms, 'kv' per KV point."""
    ok = {(p["arm"], p["kind"], p["ctx"]): p for p in m["points"] if p["status"] == "ok"}
    rows = []
    for (arm, kind, n), p in sorted(ok.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        cfg = m["configs"][arm]
        if kind in KV_KINDS:
            cap = p.get("capacity_tokens") or n
            an = acc.kv_cache_bytes(cfg, cap, p["storage"], include_state=True)
            nb = (f"; cache.nbytes() / accounting {p['bytes_nbytes'] / an:.6g}" if _positive(p.get("bytes_nbytes"))
                  else "")
            rows.append({"row": "kv", "kind": kind, "arm": arm, "ctx": n, "measured": p["bytes_tensors"],
                         "analytic": an, "measured_over_analytic": p["bytes_tensors"] / an, "achieved_tflops": "",
                         "note": f"bytes of every cache tensor, {p['storage']} storage, capacity {cap} tokens{nb}"})
            continue
        s, f = seconds_per_token(p), flops_per_token(cfg, kind, n)
        note = p.get("mode") or p.get("cache_fill") or ""
        rows.append({"row": "cost", "kind": kind, "arm": arm, "ctx": n, "measured": s, "analytic": f,
                     "measured_over_analytic": "", "achieved_tflops": f / s / 1e12,
                     "note": f"s per token measured, FLOPs per token analytic; {note}".rstrip("; ")})
    for (arm, kind, n), p in ok.items():
        if arm != "v4" or kind in KV_KINDS or ("dense", kind, n) not in ok:
            continue
        mr = seconds_per_token(p) / seconds_per_token(ok[("dense", kind, n)])
        ar = flops_per_token(m["configs"]["v4"], kind, n) / flops_per_token(m["configs"]["dense"], kind, n)
        rows.append({"row": "v4/dense", "kind": kind, "arm": "v4/dense", "ctx": n, "measured": mr, "analytic": ar,
                     "measured_over_analytic": mr / ar, "achieved_tflops": "",
                     "note": "time per token ratio measured, FLOPs per token ratio analytic"})
    return rows


# --------------------------------------------------------------------------------------------------------------
# the figure
# --------------------------------------------------------------------------------------------------------------

def _series(m: dict, arm: str, kind: str, value, where=lambda p: True):
    pts = sorted((p for p in m["points"] if p["arm"] == arm and p["kind"] == kind and p["status"] == "ok"
                  and where(p)), key=lambda p: p["ctx"])
    return [p["ctx"] for p in pts], [value(p) for p in pts]


def _grid(ctxs) -> list[int]:
    lo, hi = min(ctxs), max(ctxs)
    k = max(2, int(8 * math.log10(max(hi / lo, 10))))
    return sorted({int(round(lo * (hi / lo) ** (i / k))) for i in range(k + 1)} | set(ctxs))


def plot_efficiency_measured(json_path, out_dir: str = "figures") -> list[Path]:
    json_path = Path(json_path)
    if not json_path.exists():
        print(f"[efficiency_measured] {json_path.name} not found: figure not drawn (measure it on a GPU with "
              "benchmarks/bench_efficiency.py)")
        return []
    m = load_measured(json_path)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = compare(m)

    fig, ax = plt.subplots(2, 3, figsize=(16, 8.6))
    ax = ax.ravel()
    presets = m["settings"].get("arms", {})
    for arm in ARMS:
        c, lab = COLORS[arm], f"{LABELS[arm]} ({presets.get(arm, '?')})"
        x, y = _series(m, arm, "train", lambda p: p["tokens_per_s"] / 1e3)
        ax[0].plot(x, y, "o-", color=c, label=lab)
        x, y = _series(m, arm, "train", lambda p: p["peak_mem_gb"], lambda p: p.get("peak_mem_gb") is not None)
        ax[1].plot(x, y, "o-", color=c, label=lab)
        x, y = _series(m, arm, "prefill", lambda p: p["prefill_s"])
        ax[2].plot(x, y, "o-", color=c, label=f"{lab}, cached prefill")
        x, y = _series(m, arm, "forward", lambda p: p["forward_s"])
        ax[2].plot(x, y, "s--", color=c, mfc="none", label=f"{lab}, forward (kernels, no cache)")
        for fill, mfc in (("prefill", c), ("synthetic", "none")):
            x, y = _series(m, arm, "decode", lambda p: p["ms_per_token"], lambda p, f=fill: p["cache_fill"] == f)
            how = "after prefill" if fill == "prefill" else "filled synthetically"
            ax[3].plot(x, y, "o", color=c, mfc=mfc, label=f"{lab}, cache {how}")
        x, y = _series(m, arm, "decode", lambda p: p["ms_per_token"])
        ax[3].plot(x, y, "-", color=c, lw=0.8)
        for kind, mk, ls in (("kv", "o", "-"), ("kv_paper", "s", ":")):
            kvp = [p for p in m["points"] if p["arm"] == arm and p["kind"] == kind and p["status"] == "ok"]
            if not kvp:
                continue
            st = kvp[0]["storage"]
            x, y = _series(m, arm, kind, lambda p: p["bytes_tensors"] / 2**20)
            ax[4].plot(x, y, mk, color=c, mfc="none", ms=8, label=f"{lab}, measured, {st}")
            g = _grid([p["ctx"] for p in kvp])
            ax[4].plot(g, [acc.kv_cache_bytes(m["configs"][arm], n, st, include_state=True) / 2**20 for n in g],
                       ls, color=c, lw=1, label=f"{lab}, accounting, {st} + states")
    for kind, (mk, kc) in KIND_STYLE.items():
        rr = sorted((r for r in rows if r["row"] == "v4/dense" and r["kind"] == kind), key=lambda r: r["ctx"])
        if rr:
            ax[5].plot([r["ctx"] for r in rr], [r["measured"] for r in rr], mk, color=kc, label=f"{kind}: measured",
                       **({"mfc": "none", "ms": 10} if kind == "train" else {}))
    for kinds, ls in ((("train", "forward", "prefill"), "-"), (("decode",), "--")):   # train = 3 x forward: one ratio
        ctxs = [p["ctx"] for p in m["points"] if p["kind"] in kinds]
        if ctxs:
            g = _grid(ctxs)
            ax[5].plot(g, [flops_per_token(m["configs"]["v4"], kinds[0], n)
                           / flops_per_token(m["configs"]["dense"], kinds[0], n) for n in g], ls, color="k", lw=1,
                       label=f"FLOPs ratio (accounting), {' / '.join(kinds)}")
    ax[5].axhline(1.0, color="k", lw=0.6)
    titles = [("training throughput (measured)", "tokens / s (thousands)"),
              ("training peak memory (measured)", "GiB (torch.cuda.max_memory_allocated)"),
              ("prefill of one sequence (measured)", "seconds"),
              ("decode, batch 1 (measured)", "ms per token"),
              ("KV cache of one sequence", "MiB"),
              ("V4 / dense cost per token", "ratio (< 1: V4 cheaper)")]
    from matplotlib.ticker import FuncFormatter, NullFormatter
    ticks = sorted({p["ctx"] for p in m["points"]})
    for a, (t, yl) in zip(ax, titles):
        a.set(xscale="log", xlabel="context length (tokens)", title=t, ylabel=yl)
        if ticks:
            a.set_xticks(ticks)
            a.set_xlim(min(ticks) / 1.25, max(ticks) * 1.25)
            a.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _ctx_label(v)))
            a.xaxis.set_minor_formatter(NullFormatter())
        a.grid(alpha=0.3, which="both")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
        if not any(len(l.get_xdata()) for l in a.get_lines() if l.get_marker() not in ("", "None")):
            a.text(0.5, 0.5, "no measured points" + (" (peak memory is measured on CUDA only)" if a is ax[1] else ""),
                   transform=a.transAxes, ha="center", fontsize=8, color="0.4")
    for i in (2, 3, 4, 5):
        if ax[i].get_lines() and any(len(l.get_xdata()) for l in ax[i].get_lines()):
            ax[i].set_yscale("log")
    missing = [f"{p['arm']} {p['kind']} {p['ctx']}: {p.get('reason') or p.get('error', '')}"[:90]
               for p in m["points"] if p["status"] != "ok"]
    env = m["env"]
    where = env.get("gpu", m["settings"].get("device", "?"))
    fig.suptitle(f"Measured efficiency vs context, {presets.get('v4', 'v4')} vs {presets.get('dense', 'dense')} on "
                 f"{where} ({_commits(m)}); lines without markers: dsv4_lab.accounting",
                 fontsize=10)
    if missing:
        fig.text(0.01, 0.005, "not measured: " + "; ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""),
                 fontsize=6.5, va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    png = out / "efficiency_measured.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)

    csv = out / "efficiency_measured.csv"
    cols = ["row", "kind", "arm", "ctx", "measured", "analytic", "measured_over_analytic", "achieved_tflops", "note"]
    lines = [",".join(cols)] + [",".join(_cell(r[c]) for c in cols) for r in rows]
    csv.write_text("\n".join(lines) + "\n")
    md = out / "efficiency_measured.md"
    md.write_text(companion(m, rows))
    return [png, csv, md]


def _ctx_label(v: float) -> str:
    v = int(round(v))
    for unit, n in (("M", 2**20), ("K", 2**10)):
        if v >= n and v % n == 0:
            return f"{v // n}{unit}"
    return str(v)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    s = str(v)
    return f'"{s}"' if "," in s else s


def _commits(m: dict) -> str:
    """The commits the points were measured at: one per device call (a rerun measures only the points missing)."""
    calls = m.get("calls") or [m["env"]]
    shas = list(dict.fromkeys(str(c.get("commit", "?"))[:7] for c in calls))
    return ("commit " if len(shas) == 1 else "commits ") + ", ".join(shas)


def _calls(m: dict) -> str:
    return "; ".join(f"{c.get('time', '?')} at {str(c.get('commit', '?'))[:7]}" for c in m.get("calls") or [m["env"]])


def companion(m: dict, rows: list[dict]) -> str:
    """The figure's companion text: what was measured where, the measured vs analytic ratios, and why they differ."""
    env, s = m["env"], m["settings"]
    out = [f"# Measured efficiency vs context ({Path(m['path']).name})", "",
           f"Device {env.get('gpu', s.get('device', '?'))}, torch {env.get('torch', '?')}, "
           f"measured in {len(m.get('calls') or [env])} device calls ({_calls(m)}); arms {s.get('arms')}; training modes {s.get('train_mode')} (eager above "
           f"{s.get('eager_above')}), {s.get('tokens_per_step')} tokens per step; amp {s.get('amp')}, cache storage "
           f"{s.get('storage')}, prefill chunk {s.get('prefill_chunk')}.", "",
           "| kind | context | V4 / dense measured | FLOPs ratio (accounting) | measured / accounting |",
           "|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r["row"] == "v4/dense"), key=lambda r: (r["kind"], r["ctx"])):
        out.append(f"| {r['kind']} | {r['ctx']} | {r['measured']:.3g} | {r['analytic']:.3g} | "
                   f"{r['measured_over_analytic']:.3g} |")
    kv = [r for r in rows if r["row"] == "kv"]                           # both storages
    if kv:
        worst = max(kv, key=lambda r: abs(r["measured_over_analytic"] - 1))
        out += ["", f"KV bytes: measured / accounting between {min(r['measured_over_analytic'] for r in kv):.4f} and "
                    f"{max(r['measured_over_analytic'] for r in kv):.4f} over {len(kv)} points (furthest: "
                    f"{worst['arm']} at {worst['ctx']})."]
    bad = [p for p in m["points"] if p["status"] != "ok"]
    if bad:
        why = lambda p: ((p.get("reason") or p.get("error") or "?").splitlines() or ["?"])[0][:160]  # noqa: E731
        out += ["", "Not measured:"] + [f"- {p['arm']} {p['kind']} {p['ctx']}: {why(p)}" for p in bad]
    synth = sorted({(p["arm"], p["ctx"]) for p in m["points"] if p["kind"] == "decode" and p["status"] == "ok"
                    and p.get("cache_fill") == "synthetic"})
    if synth:
        out += ["", "Decode on a synthetically filled cache (no real prefill at that length): "
                + ", ".join(f"{a} {n}" for a, n in synth) + "."]
    return "\n".join(out + ["", "## " + WHY.splitlines()[0].rstrip(":"), ""] + WHY.splitlines()[1:]) + "\n"
