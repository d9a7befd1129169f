"""Preemptible generation: a token-granular write-ahead log (WAL) for `generate(..., wal=path)`, and the length-bias
simulation that shows why it matters (docs §6.6).

    ids = generate(model, prompt_ids, 64, temperature=0.8, generator=g, wal="gen.wal")   # killed at any point ...
    ids = generate(model, prompt_ids, 64, temperature=0.8, generator=g, wal="gen.wal")   # ... rerun: same tokens

Protocol (generate.py calls `open_wal` once, then `WAL.append` once per decode step):
  - every sampled step i is appended as one record {step i, the B token ids, the sampler's RNG state after the
    draw} and fsync'd BEFORE the token joins the output, so a token the caller may have seen is always on disk;
  - a rerun with the same path reads the log, checks it was written for this model (config + weights hash), this
    prompt and these settings (else WALError naming the field), restores the sampler's RNG state from the last
    record, re-prefills the prompt exactly as the first run did and feeds the logged tokens one per step (the same
    calls as the first run, so the cache ends bitwise in the same state), then samples on from step n_logged;
  - a last record cut by a kill (no newline, bad JSON or bad CRC) is dropped and the file truncated to its last
    good record; a bad record before the last one is corruption (WALError). Steps must run 0, 1, 2, ... with no gap.

File: UTF-8 lines `CRC32(hex, 8) SP JSON NL`; line 1 the header {format, version, model, prompt, settings, rng0,
env}, then one record per step {step, tokens, rng}. rng is the generator state (base64) or null for greedy decoding.
env (torch version, intra-op threads) is not refused when it differs, only warned about: the logged tokens stay
valid, but an exact continuation needs the same arithmetic.

Length bias (`length_bias_simulation`, `plot_length_bias`): restarting a preempted generation from scratch draws a
new sample, and only an attempt that outlives every preemption is returned, so the returned lengths follow
p(L) (1 - q)^L instead of p(L): a bias toward short outputs. Resuming from the WAL returns the uninterrupted sample.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import warnings
import zlib
from pathlib import Path

import torch

FORMAT, VERSION = "dsv4-lab generation wal", 1


class WALError(ValueError):
    """A write-ahead log cannot be used for this generation; the message names the file, the field and the values."""


# ---------------------------------------------------------------------------------------------------------------
# Identity of a generation: model, prompt, settings
# ---------------------------------------------------------------------------------------------------------------

def model_fingerprint(model) -> str:
    """sha256 over the config (JSON) and every parameter / buffer (name, dtype, shape, bytes) in state_dict order."""
    h = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def prompt_fingerprint(prompt_ids: torch.Tensor) -> str:
    t = prompt_ids.detach().cpu().to(torch.int64).contiguous()
    return hashlib.sha256(f"{tuple(t.shape)}".encode() + t.numpy().tobytes()).hexdigest()


def sampler_generator(generator, device) -> torch.Generator:
    """The generator torch.multinomial draws from: the one given, else the device's default generator."""
    if generator is not None:
        return generator
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def _env() -> dict:
    """What else decides the bits of the logits on one device: the torch build and the intra-op thread count."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads()}


def _rng_b64(gen: torch.Generator) -> str:
    return base64.b64encode(gen.get_state().numpy().tobytes()).decode("ascii")


def _rng_set(gen: torch.Generator, b64: str) -> None:
    import numpy as np
    state = torch.from_numpy(np.frombuffer(base64.b64decode(b64), dtype=np.uint8).copy())
    gen.set_state(state)


# ---------------------------------------------------------------------------------------------------------------
# The log file
# ---------------------------------------------------------------------------------------------------------------

def _line(obj: dict) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    return f"{zlib.crc32(body):08x} ".encode() + body + b"\n"


def _parse(line: bytes):
    """One line (without its newline) -> dict, or None when it is not a whole, intact record."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WAL:
    """An open log: `tokens` (n_logged, B) long of the steps already on disk, `append(step, tokens, gen)`."""

    def __init__(self, path: Path, fd: int, tokens: torch.Tensor, sampling: bool):
        self.path, self.fd, self.tokens, self.sampling = path, fd, tokens, sampling

    @property
    def n_logged(self) -> int:
        return self.tokens.shape[0]

    def append(self, step: int, tokens: torch.Tensor, gen: torch.Generator | None) -> None:
        """Durably log step `step` (its B token ids and the sampler state after the draw): write, then fsync."""
        rec = {"step": int(step), "tokens": [int(t) for t in tokens.reshape(-1).tolist()],
               "rng": _rng_b64(gen) if (self.sampling and gen is not None) else None}
        data = _line(rec)
        while data:
            data = data[os.write(self.fd, data):]
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    __del__ = close


def open_wal(path, model, prompt_ids: torch.Tensor, settings: dict, generator) -> WAL:
    """Create the log at `path` (header only) or reopen it for a resume. On resume the sampler's RNG state is set
    to the one logged after the last good step (or to the header's initial state when no step was logged).

    settings: the generate() arguments that change the tokens (max_new_tokens, temperature, top_k, eos_id, storage,
    prefill_chunk); batch size and device are added here."""
    path = Path(path)
    B = prompt_ids.shape[0]
    sampling = settings["temperature"] > 0
    gen = sampler_generator(generator, prompt_ids.device) if sampling else None
    settings = {**settings, "batch_size": B, "device": prompt_ids.device.type}
    header = {"format": FORMAT, "version": VERSION, "model": model_fingerprint(model),
              "prompt": prompt_fingerprint(prompt_ids), "settings": settings,
              "rng0": _rng_b64(gen) if gen is not None else None, "env": _env()}
    if not path.exists() or path.stat().st_size == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        from ..runlog import atomic_write_bytes
        atomic_write_bytes(path, _line(header))                    # the header appears whole or not at all
        _fsync_dir(path)
        return WAL(path, os.open(path, os.O_WRONLY | os.O_APPEND), torch.zeros(0, B, dtype=torch.long), sampling)
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    whole, tail = lines[:-1], lines[-1]                            # tail: bytes after the last newline (torn if any)
    head = _parse(whole[0]) if whole else None
    if head is None or head.get("format") != FORMAT:
        raise WALError(f"wal {path}: line 1 is not a generation wal header; allowed: a file written by "
                       "generate(..., wal=path), or a path that does not exist yet")
    if head.get("version") != VERSION:
        raise WALError(f"wal {path}: format version {head.get('version')!r} is not allowed: version {VERSION}")
    for key, what in (("model", "model (config + weights hash)"), ("prompt", "prompt (ids hash)")):
        if head.get(key) != header[key]:
            raise WALError(f"wal {path} was written for another {what}: logged {str(head.get(key))[:16]}..., "
                           f"given {header[key][:16]}...; use a new wal path for a new generation")
    for k, v in settings.items():
        logged = (head.get("settings") or {}).get(k)
        if logged != json.loads(json.dumps(v)):
            raise WALError(f"wal {path} was written with {k}={logged!r}, this call has {k}={v!r}; "
                           "allowed: the same settings, or a new wal path")
    if head.get("env") != header["env"]:                           # kept tokens stay; later ones may differ
        warnings.warn(f"wal {path} was written under {head.get('env')}, this process runs {header['env']}: the "
                      "logged tokens are kept, but the continuation is only guaranteed to equal an uninterrupted "
                      "run when the arithmetic (torch version, intra-op threads) is the same", stacklevel=3)
    recs, good_end = [], len(whole[0]) + 1                          # byte offset after the last good record
    for j, line in enumerate(whole[1:]):
        rec = _parse(line)
        last = j == len(whole) - 2 and not tail
        ok = (rec is not None and rec.get("step") == len(recs) and isinstance(rec.get("tokens"), list)
              and len(rec["tokens"]) == B and (isinstance(rec.get("rng"), str) or gen is None))
        if not ok:
            if last:                                               # torn by a kill: drop it
                tail = b"torn"
                break
            raise WALError(f"wal {path} line {j + 2} is not step {len(recs)}'s record (damaged file); "
                           "allowed: a log whose only bad record is its last one; delete it to start over")
        recs.append(rec)
        good_end += len(line) + 1
    if recs and recs[-1]["step"] >= settings["max_new_tokens"]:
        raise WALError(f"wal {path} holds step {recs[-1]['step']} >= max_new_tokens={settings['max_new_tokens']}")
    if tail:                                                       # drop the torn record, durably
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
    if gen is not None:                                            # the sampler continues where the log stops
        _rng_set(gen, recs[-1]["rng"] if recs else head["rng0"])
    tokens = torch.tensor([r["tokens"] for r in recs], dtype=torch.long).reshape(len(recs), B)
    return WAL(path, os.open(path, os.O_WRONLY | os.O_APPEND), tokens, sampling)


def read_wal(path) -> tuple[dict, list[dict]]:
    """(header, good records) of a log, for inspection and tests (a torn last record is left out, not removed)."""
    lines = Path(path).read_bytes().split(b"\n")[:-1]
    objs = [_parse(x) for x in lines]
    good = []
    for o in objs[1:]:
        if o is None:
            break
        good.append(o)
    return objs[0], good


# ---------------------------------------------------------------------------------------------------------------
# Length bias of restart-from-scratch vs WAL resume (a simulation)
# ---------------------------------------------------------------------------------------------------------------

def lognormal_length_pmf(median: float, sigma: float, max_len: int):
    """The synthetic stopping distribution: L = min(max_len, ceil(exp(N(ln median, sigma^2)))), L >= 1.
    Returns p (max_len + 1,) numpy float64 with p[0] = 0."""
    import numpy as np
    mu = math.log(median)
    cdf = lambda x: 0.5 * (1 + math.erf((math.log(x) - mu) / (sigma * math.sqrt(2)))) if x > 0 else 0.0  # noqa
    p = np.zeros(max_len + 1)
    for L in range(1, max_len):
        p[L] = cdf(L) - cdf(L - 1)
    p[max_len] = 1.0 - cdf(max_len - 1)
    return p


def length_bias_simulation(n_generations: int = 4000, preempt_prob: float = 0.005, median: float = 64.0,
                           sigma: float = 1.0, max_len: int = 1024, seed: int = 0) -> dict:
    """Many generations under random preemption; the returned-length distribution of three serving policies.

    Model of a generation (stated, synthetic): an attempt's length L is a fresh draw from `lognormal_length_pmf`
    (median `median` tokens, log-sd `sigma`, capped at `max_len`); while decoding, each generated token is followed
    by a preemption with probability `preempt_prob` (preemptions arrive at a constant rate in decode time).
      uninterrupted  the first attempt's L (no preemption at all)
      restart        a preempted attempt is discarded and the request restarts from scratch with a NEW sample (the
                     sampler state was not persisted); returned: the first attempt that finished unpreempted
      wal            a preempted attempt resumes from its log and continues the SAME sample (tests/test_wal.py
                     proves token-exact resume on the real generate()); returned: the first attempt's L
    Analytic: restart returns L with probability p(L) (1 - q)^L / sum_L' p(L') (1 - q)^L' (q = preempt_prob).

    Returns a dict of numpy arrays / floats: lengths {uninterrupted, restart, wal} (n_generations,), pmf p(L),
    pmf_restart (the analytic tilted law), mean / analytic_mean per policy, preemptions per policy, wasted_decode
    (tokens decoded then thrown away: restart only) and reprefill (tokens re-prefilled on resume: wal only), and
    the parameters. Notebook use:
        res = length_bias_simulation(n_generations=4000, preempt_prob=0.005)
        fig = plot_length_bias(res)
    """
    import numpy as np
    if n_generations < 1:
        raise ValueError(f"n_generations={n_generations!r} is not allowed: a positive integer")
    if not 0 <= preempt_prob < 1:
        raise ValueError(f"preempt_prob={preempt_prob!r} is not allowed: a number in [0, 1)")
    if max_len < 1 or median <= 0 or sigma <= 0:
        raise ValueError(f"median={median!r}, sigma={sigma!r}, max_len={max_len!r}: need median > 0, sigma > 0, "
                         "max_len >= 1")
    rng = np.random.default_rng(seed)
    p = lognormal_length_pmf(median, sigma, max_len)
    Ls = np.arange(max_len + 1)
    draw = lambda n: rng.choice(Ls, size=n, p=p)                        # noqa: E731
    # first preemption after K tokens of an attempt: K ~ Geometric(q) on 1, 2, ... (never when q = 0)
    first_preempt = (lambda n: rng.geometric(preempt_prob, size=n)) if preempt_prob > 0 else \
        (lambda n: np.full(n, np.iinfo(np.int64).max))
    L0 = draw(n_generations)
    # wal: the same sample as uninterrupted; count its preemptions (each one re-prefills the logged tokens)
    wal_pre = np.zeros(n_generations, dtype=np.int64)
    wal_reprefill = np.zeros(n_generations, dtype=np.int64)
    done_at = np.zeros(n_generations, dtype=np.int64)                   # tokens already logged
    active = np.ones(n_generations, dtype=bool)
    while active.any():
        idx = np.flatnonzero(active)
        k = first_preempt(len(idx))
        hit = done_at[idx] + k < L0[idx]                                # preempted before the last token
        wal_pre[idx[hit]] += 1
        done_at[idx[hit]] += k[hit]
        wal_reprefill[idx[hit]] += done_at[idx[hit]]
        active[idx[~hit]] = False
    # restart: attempt 0 is the uninterrupted sample; each preempted attempt draws a fresh one
    out = L0.copy()
    rs_pre = np.zeros(n_generations, dtype=np.int64)
    wasted = np.zeros(n_generations, dtype=np.int64)
    active = np.ones(n_generations, dtype=bool)
    cur = L0.copy()
    while active.any():
        idx = np.flatnonzero(active)
        k = first_preempt(len(idx))
        hit = k < cur[idx]
        rs_pre[idx[hit]] += 1
        wasted[idx[hit]] += k[hit]
        out[idx[~hit]] = cur[idx[~hit]]
        active[idx[~hit]] = False
        cur[idx[hit]] = draw(int(hit.sum()))
    tilt = p * (1.0 - preempt_prob) ** Ls
    p_restart = tilt / tilt.sum()
    lengths = {"uninterrupted": L0, "restart": out, "wal": L0.copy()}
    return {"lengths": lengths, "pmf": p, "pmf_restart": p_restart,
            "mean": {k: float(v.mean()) for k, v in lengths.items()},
            "analytic_mean": {"uninterrupted": float((Ls * p).sum()), "restart": float((Ls * p_restart).sum()),
                              "wal": float((Ls * p).sum())},
            "preemptions": {"restart": int(rs_pre.sum()), "wal": int(wal_pre.sum())},
            "wasted_decode": int(wasted.sum()), "reprefill": int(wal_reprefill.sum()),
            "params": {"n_generations": n_generations, "preempt_prob": preempt_prob, "median": median,
                       "sigma": sigma, "max_len": max_len, "seed": seed}}


def plot_length_bias(res: dict, ax=None):
    """Empirical CDFs of the returned lengths (uninterrupted, restart-from-scratch, WAL resume) with the analytic
    laws as thin lines; log-x. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt
    import numpy as np
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
    else:
        fig = ax.figure
    styles = {"uninterrupted": dict(color="black", lw=2.5), "wal": dict(color="tab:blue", lw=1.5, ls="--"),
              "restart": dict(color="tab:red", lw=2)}
    names = {"uninterrupted": "uninterrupted", "wal": "WAL resume", "restart": "restart from scratch"}
    for k in ("uninterrupted", "restart", "wal"):
        x = np.sort(res["lengths"][k])
        ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post",
                label=f"{names[k]} (mean {res['mean'][k]:.0f})", **styles[k])
    Ls = np.arange(len(res["pmf"]))
    ax.plot(Ls[1:], np.cumsum(res["pmf"])[1:], color="grey", lw=0.8, label="analytic p(L)")
    ax.plot(Ls[1:], np.cumsum(res["pmf_restart"])[1:], color="tab:red", lw=0.8, alpha=0.6,
            label="analytic p(L)(1-q)^L")
    pr = res["params"]
    ax.set_xscale("log")
    ax.set_xlabel("returned length (tokens)")
    ax.set_ylabel("fraction of generations <= length")
    ax.set_title(f"preemption q = {pr['preempt_prob']} per token, {pr['n_generations']} generations")
    ax.legend(fontsize=8, loc="lower right")
    return fig
