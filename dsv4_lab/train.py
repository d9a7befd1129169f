"""The training loop: one process or `torchrun --nproc_per_node=N` (parallel=ddp | fsdp2, dsv4_lab/parallel.py;
gloo on CPU, NCCL on GPU).

    python -m dsv4_lab train preset=tiny max_steps=40 run_dir=runs/x seed=1 lr=3e-3

Writes `run_dir/config.json`, `env.json`, `metrics.jsonl` (one object per logged step: step, train_loss, lr,
tokens, flops, and val_loss on eval steps; `losses` = the train loss of every step since the previous record and
`grad_norm_max` = their largest pre-clip gradient norm, so spikes can be counted, dsv4_lab/metrics.py) and
`ckpt.pt`; checkpoint steps are always logged, so a resumed run's per-step losses have no gap. A killed run
restarted with the same run_dir resumes from its last checkpoint and sees the same batches it would have seen
(batches are a pure function of (seed, step); each rank takes its rows of the global batch, so any number of
ranks sees the same batches and a checkpoint resumes on any number of ranks); a finished run is skipped. The LR
schedule's horizon is `max_steps`, never early stopping.

Bad input stops before anything is written (ConfigError / RunError, one line naming the field or file): the run
dir, its config.json (required to resume), the checkpoint (checksum, weights-only load, same config) and the data
are all checked first. A non-finite loss stops the run naming the step; the checkpoint written before it stays.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from .config import ConfigError, ModelConfig, TrainConfig, check_train_pair
from .data import Batches, Prefetched
from .model import DSV4LM
from .moe import routing_key
from .parallel import RankBatches, check_supported, full_state, full_tensor, load_full_state, wrap
from .runlog import (MetricsLog, RunError, check_run_dir, config_diff, environment, load_checkpoint,
                     same_config, save_checkpoint, save_json)


# --------------------------------------------------------------------------------------------------------------
# learning-rate schedule (horizon fixed by the config)
# --------------------------------------------------------------------------------------------------------------

def lr_at(step: int, tc: TrainConfig) -> float:
    """Warm-up, then cosine to lr*min_lr_ratio, or WSD (warm-up, stable, linear decay over the last fraction)."""
    lo = tc.lr * tc.min_lr_ratio
    if tc.warmup_steps and step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.schedule == "cosine":
        span = max(tc.max_steps - tc.warmup_steps, 1)
        frac = min((step - tc.warmup_steps) / span, 1.0)
        return lo + 0.5 * (tc.lr - lo) * (1 + math.cos(math.pi * frac))
    decay_start = int(tc.max_steps * (1 - tc.wsd_decay_frac))
    if step < decay_start:
        return tc.lr
    frac = (step - decay_start) / max(tc.max_steps - decay_start, 1)
    return tc.lr - (tc.lr - lo) * min(frac, 1.0)


def lr_decay_started(step: int, tc: TrainConfig) -> bool:
    """True once the LR starts to decay (MTP weight 0.3 -> 0.1 then, docs §4)."""
    if step < tc.warmup_steps:
        return False
    return tc.schedule == "cosine" or step >= int(tc.max_steps * (1 - tc.wsd_decay_frac))


# --------------------------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------------------------

def build_optimizer(model: torch.nn.Module, tc: TrainConfig):
    """AdamW, or the paper's Muon + AdamW split (dsv4_lab.optim, docs §7)."""
    from .optim import build_optimizer as build
    return build(model, tc)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> tuple[float, str]:
    """Training FLOPs per token (forward + backward = 3x forward, plain FLOPs) and how they were counted."""
    from .accounting import prefill_flops
    return 3.0 * prefill_flops(cfg, seq_len) / seq_len, "3 x accounting.prefill_flops(plain) / seq_len, no MTP"


def resolve_device(tc: TrainConfig, local_rank: int = 0) -> torch.device:
    if tc.device == "cuda" or (tc.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("config field 'device' = 'cuda' is not allowed: no CUDA device is available "
                              "(use device=auto or device=cpu)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def call_step_hooks(model: torch.nn.Module, step: int, loss: float) -> None:
    for m in model.modules():
        fn = getattr(m, "on_train_step", None)
        if fn is not None and m is not model:
            fn(step, loss)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Batches, n: int, device, amp, window: int | None = None) -> dict:
    """Validation loss (and task accuracy, composite mHC gain) over n validation batches, eagerly even where the
    training step is compiled (compilation.eager)."""
    from .compilation import eager
    with eager():
        was = model.training
        model.eval()
        losses, accs = [], []
        for i in range(n):
            x, y = (t.to(device) for t in batches.val_batch(i))
            with amp():
                out = model(x, y)
            losses.append(out.lm_loss.item())
            if batches.is_task:
                from .data.synthetic import answer_accuracy
                accs.append(answer_accuracy(out.logits, y, x, window))
        res = {"val_loss": sum(losses) / len(losses)}
        if accs:
            for k in accs[0]:
                vals = [a[k] for a in accs if not math.isnan(a[k])]
                res[f"val_{k}"] = sum(vals) / len(vals) if vals else float("nan")
        from .metrics import composite_mapping_gain
        gain = composite_mapping_gain(model, batches.val_batch(0)[0][:1].to(device), amp)
        if gain is not None:
            res["hc_composite_gain"] = gain
        model.train(was)
        return res


def _config_record(mc: ModelConfig, tc: TrainConfig) -> dict:
    return {"model": mc.to_dict(), "train": tc.to_dict()}


def _resume(ckpt_path: Path, record: dict, model, opt, device, max_steps: int) -> int:
    """Load ckpt.pt into model + optimizer + CPU RNG; the step to continue from. RunError naming the file if it
    is damaged (runlog.load_checkpoint) or belongs to another configuration."""
    ck = load_checkpoint(ckpt_path, map_location=device)
    if "config" in ck:
        try:
            theirs = json.loads(ck["config"])
        except (TypeError, json.JSONDecodeError):
            raise RunError(f"checkpoint {ckpt_path} holds a damaged config record; delete it or use another run_dir")
        if not isinstance(theirs, dict) or not same_config(theirs, record):
            raise RunError(f"checkpoint {ckpt_path} was written by another configuration than its config.json "
                           f"({'; '.join(config_diff(theirs, record))}); delete it or use another run_dir")
    if not 0 <= ck["step"] < max_steps:
        raise RunError(f"checkpoint {ckpt_path} is at step {ck['step']}, outside this run's 0..{max_steps - 1}; "
                       "delete it or use another run_dir")
    try:                                           # full tensors, placed as this run holds them (parallel.py)
        load_full_state(model, opt, ck["model"], ck["optimizer"])
        torch.set_rng_state(ck["rng_cpu"].cpu())     # loaded onto the run's device with the rest
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        msg = " ".join(str(e).split())[:200]
        raise RunError(f"checkpoint {ckpt_path} does not fit this model and optimizer ({type(e).__name__}: {msg}); "
                       "delete it or use another run_dir") from None
    return ck["step"] + 1


def _final_record(metrics: MetricsLog, max_steps: int) -> dict:
    """The record of a finished run's last step; RunError if metrics.jsonl lost it (never an earlier record)."""
    recs = metrics.read()
    if not recs or recs[-1]["step"] != max_steps - 1:
        have = f"its last record is step {recs[-1]['step']}" if recs else "it holds no record"
        raise RunError(f"{metrics.path}: the run finished (step {max_steps - 1}) but {have}, not the "
                       f"final step {max_steps - 1} (file emptied or its last line cut); the result is lost: "
                       "rerun in another run_dir")
    return recs[-1]


class _NoBar:
    def set_postfix(self, *a, **k):
        pass

    def update(self, n=1):
        pass

    def close(self):
        pass


def progress_bar(enabled: bool, total: int, initial: int, desc: str):
    """tqdm, imported only when the bar is on: the notebook widget only where ipywidgets is installed (without
    it tqdm.auto warns "IProgress not found" in Jupyter), the text bar otherwise."""
    if not enabled:
        return _NoBar()
    try:
        import ipywidgets  # noqa: F401
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm.std import tqdm
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------------------

def train(mc: ModelConfig, tc: TrainConfig) -> dict:
    """Train (or resume, or skip if finished) and return the last metrics record."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world, local_rank = 0, 1, 0
    if distributed:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        use_cuda = tc.device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if tc.batch_size % world:
        raise ConfigError(f"config field 'batch_size' = {tc.batch_size} is not allowed: a multiple of the number "
                          f"of processes ({world})")
    check_train_pair(mc, tc)
    if distributed:
        check_supported(mc, tc.parallel)
    device = resolve_device(tc, local_rank)
    if tc.cuda_graph and (device.type != "cuda" or distributed):
        raise ConfigError(f"config field 'cuda_graph' = True is not allowed "
                          f"{'on device ' + device.type if device.type != 'cuda' else 'with several processes'}: "
                          f"one process on a GPU (device=cuda)")
    if tc.deterministic:                           # before the first GEMM (inference/batch_invariance.py)
        from .inference.batch_invariance import set_deterministic
        set_deterministic(device, mc.kernels, tc.compile)
    run_dir = Path(tc.run_dir)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    ckpt_path = run_dir / "ckpt.pt"
    record = _config_record(mc, tc)

    # everything is checked before anything is written: a finished or interrupted run with the same config is
    # skipped or resumed; another config, a checkpoint without config.json or a damaged file are refused
    same_run = check_run_dir(run_dir, record)
    torch.manual_seed(tc.seed)
    model = DSV4LM(mc).to(device)
    ddp_model = model                              # what forward is called on: DDP wrapper or the fsdp2 model
    if distributed:                                # before the optimizer: fsdp2 replaces parameters by shards
        ddp_model = wrap(model, tc.parallel, device, find_unused=mc.ffn == "moe" or "csa" in mc.layer_types)
    opt = build_optimizer(model, tc)
    start_step = 0
    if same_run and ckpt_path.exists():
        start_step = _resume(ckpt_path, record, model, opt, device, tc.max_steps)
    if start_step >= tc.max_steps or (same_run and not ckpt_path.exists() and (run_dir / "finished.json").exists()):
        if distributed:                            # finished (a sweep may drop the checkpoint, keep finished.json)
            dist.destroy_process_group()
        return _final_record(metrics, tc.max_steps)
    try:                                           # the data source can make this run's batches
        batches = Batches(tc.data, tc.seq_len, tc.batch_size, tc.seed, 0, tc.task_n_pairs, tc.task_n_queries,
                          tc.task_n_needles, tc.task_n_near, tc.task_mrcr_queries)
        batches.train_batch(start_step)
        batches.val_batch(0)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"config field 'data' = {tc.data!r} cannot make batches of seq_len={tc.seq_len}: "
                          f"{' '.join(str(e).split())}") from None
    if distributed:                                # every rank: its rows of the global batch
        batches = RankBatches(batches, rank, world)
    if device.type == "cuda":                      # the next batch is built while the GPU runs this step
        batches = Prefetched(batches, tc.max_steps - 1)
    if rank == 0:
        try:
            if start_step:
                metrics.truncate_after(start_step - 1)
            elif metrics.path.exists():
                metrics.path.unlink()
            save_json(record, run_dir / "config.json")
            env = environment(device)
            env["world_size"] = world
            env["parallel"] = tc.parallel if distributed else "none"
            if start_step:
                env["resumed_from_step"] = start_step
            save_json(env, run_dir / ("env.json" if not start_step else f"env.resume{start_step}.json"))
        except OSError as e:
            raise RunError(f"run_dir {run_dir} cannot be written ({e.strerror or e}); use another run_dir") from None

    use_bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and device.type == "cuda")
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    fpt, flops_method = flops_per_token(mc, tc.seq_len)
    tokens_per_step = tc.batch_size * tc.seq_len
    from .compilation import compile_model, regional, wants_compile
    fwd = ddp_model
    if wants_compile(tc.compile, device, tokens=(tc.max_steps - start_step) * tokens_per_step):
        fwd = compile_model(ddp_model, regional=regional(tc.compile, device))
    graphed = None                                                       # cuda_graph=true: dsv4_lab/cuda_graph.py
    if tc.cuda_graph:
        from .cuda_graph import GraphedStep
        graphed = GraphedStep(model, amp)

    bar = progress_bar(tc.progress and rank == 0, tc.max_steps, start_step, f"train {run_dir.name}")
    last_ckpt = start_step - 1                     # step of the last good checkpoint on disk, -1 = none
    model.train()
    last: dict = {}
    t0 = time.time()
    indexer_stage = None
    step_losses: list[float] = []          # train loss of every step since the last record
    step_gnorms: list[float] = []
    for step in range(start_step, tc.max_steps):
        if mc.indexer_warmup_steps and "csa" in mc.layer_types:
            want = "warmup" if step < mc.indexer_warmup_steps else "sparse"
            if want != indexer_stage:
                from .attention.indexer_training import set_indexer_stage
                set_indexer_stage(model, want)
                indexer_stage = want
        if model.mtp is not None and hasattr(model.mtp, "set_loss_weight"):
            model.mtp.set_loss_weight(mc.mtp_loss_weight_decay if lr_decay_started(step, tc) else mc.mtp_loss_weight)
        lr = lr_at(step, tc)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        x, y = (t.to(device) for t in batches.train_batch(step))
        if graphed is not None:                    # forward + backward; the key names the host state they read
            out = graphed(x, y, key=(indexer_stage, getattr(model.mtp, "loss_weight", None), routing_key(model)))
        else:
            with amp():
                out = fwd(x, y)
            out.loss.backward()
        # the pre-clip global gradient norm, also without clipping (max_norm=inf scales by 1)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                               tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        gnorm = full_tensor(gnorm).item()                                    # fsdp2: a DTensor
        opt.step()
        if graphed is None:                        # a graph's gradients live in its pool: replays rewrite them
            opt.zero_grad(set_to_none=True)
        losses = torch.stack([out.loss.detach().float(), out.lm_loss.detach().float()])
        if distributed:                            # the mean over ranks = the global batch's mean (equal rows)
            dist.all_reduce(losses, op=dist.ReduceOp.AVG)
        loss_f, lm_loss_f = losses.tolist()
        call_step_hooks(model, step, loss_f)
        step_losses.append(loss_f)
        step_gnorms.append(gnorm)
        if not math.isfinite(loss_f):
            kept = (f"its last good checkpoint (step {last_ckpt}) stays in {ckpt_path}" if last_ckpt >= 0
                    else "no checkpoint was written yet")
            raise RunError(f"training loss became {loss_f} at step {step}; the run stopped and {kept}; lower lr "
                           f"(now {tc.lr}) or change the config, and use another run_dir")

        is_last = step == tc.max_steps - 1
        rec = None
        if (step % tc.log_interval == 0 or is_last or (step + 1) % tc.eval_interval == 0
                or (step + 1) % tc.ckpt_interval == 0):
            rec = {"step": step, "train_loss": loss_f, "lm_loss": lm_loss_f, "lr": lr,
                   "tokens": (step + 1) * tokens_per_step, "flops": (step + 1) * tokens_per_step * fpt,
                   "time_s": time.time() - t0}
            rec["grad_norm"] = gnorm
            if graphed is not None:
                rec["cuda_graph_replays"] = graphed.replays
            rec["losses"] = [round(v, 5) for v in step_losses]
            rec["grad_norm_max"] = max(step_gnorms)
            step_losses, step_gnorms = [], []
            for k, v in out.aux.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    rec[k] = v.item()
                elif isinstance(v, (int, float)):
                    rec[k] = v
        if (step + 1) % tc.eval_interval == 0 or is_last:
            ev = evaluate(model, batches, tc.eval_batches, device, amp, getattr(mc, "window", None))
            if distributed:
                t = torch.tensor([ev[k] for k in sorted(ev)], device=device)
                dist.all_reduce(t, op=dist.ReduceOp.AVG)
                ev = dict(zip(sorted(ev), t.tolist()))
            rec.update(ev)
        if rec is not None and rank == 0:
            metrics.append(rec)
            last = rec
            bar.set_postfix(loss=f"{loss_f:.3f}", **({"val": f"{rec['val_loss']:.3f}"} if "val_loss" in rec else {}))
        if (step + 1) % tc.ckpt_interval == 0 or is_last:
            model_sd, opt_sd = full_state(model, opt)  # every rank (fsdp2 all-gathers); rank 0 writes
            if rank == 0:
                save_checkpoint({"model": model_sd, "optimizer": opt_sd, "step": step,
                                 "rng_cpu": torch.get_rng_state(), "flops_method": flops_method,
                                 "config": json.dumps(json_roundtrip(record), sort_keys=True)}, ckpt_path)
            last_ckpt = step
        bar.update(1)
    bar.close()
    if isinstance(batches, Prefetched):
        batches.close()
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return last


def json_roundtrip(obj):
    return json.loads(json.dumps(obj, default=str))
