"""One flat dataclass config for the model and one for training (docs/methodology.md §2).

Every field carries its anchor in docs/architecture.md ("docs §x"). A toggle changes exactly one thing and
its "off" value is the plain baseline. Presets: `tiny` (CPU / CI, seconds per step), `small` (one GPU, ~10-30M
parameters), `tiny-dense` / `small-dense` (the baseline arms of the same sizes), `flash` and `pro` (the paper's full shapes, docs §4, for accounting only; never instantiated in tests).

    cfg = ModelConfig.from_preset("tiny", layer_types=["swa", "csa", "hca", "csa"], index_topk=3)
    model_cfg, train_cfg = parse_overrides(["preset=tiny", "max_steps=40", "lr=3e-3"])

Bad input raises `ConfigError`, whose message names the field, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from dataclasses import dataclass, field, fields

LAYER_TYPES = ("dense", "swa", "csa", "hca")


class ConfigError(ValueError):
    """A config field got a value it cannot take; the message names field, value and what is allowed."""


def _err(name: str, value, allowed: str) -> ConfigError:
    return ConfigError(f"config field '{name}' = {value!r} is not allowed: {allowed}")


# ---------------------------------------------------------------------------------------------------------------
# Layer schedules (docs §4)
# ---------------------------------------------------------------------------------------------------------------

def flash_layer_types(n_layers: int) -> list[str]:
    """Flash-like schedule (docs §4): layers 0-1 window-only, then CSA on even and HCA on odd layers."""
    return ["swa" if i < 2 else ("csa" if i % 2 == 0 else "hca") for i in range(n_layers)]


def pro_layer_types(n_layers: int) -> list[str]:
    """Pro-like schedule (docs §4): layers 0-1 HCA, then CSA on even and HCA on odd layers."""
    return ["hca" if i < 2 else ("csa" if i % 2 == 0 else "hca") for i in range(n_layers)]


def parse_layer_types(value, n_layers: int | None = None) -> list[str]:
    """Accepts a list, or a string: `csa,hca,csa`, `dense*4`, `flash:8`, `pro:6`, `csa` (with n_layers)."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    s = str(value).strip().strip("[]").replace('"', "").replace("'", "").replace(" ", "")
    if ":" in s:
        kind, n = s.split(":", 1)
        if kind not in ("flash", "pro") or not n.isdigit():
            raise _err("layer_types", value, "'flash:N', 'pro:N', 'TYPE*N' or a comma list of " + str(LAYER_TYPES))
        return (flash_layer_types if kind == "flash" else pro_layer_types)(int(n))
    if "*" in s:
        kind, n = s.split("*", 1)
        if not n.isdigit():
            raise _err("layer_types", value, "'TYPE*N' with N a positive integer")
        return [kind] * int(n)
    if s in ("flash", "pro"):
        if not n_layers:
            raise _err("layer_types", value, "'flash:N' / 'pro:N' (give the number of layers)")
        return (flash_layer_types if s == "flash" else pro_layer_types)(n_layers)
    items = [x for x in s.split(",") if x]
    if len(items) == 1 and n_layers:
        return items * n_layers
    return items


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    # --- global shapes (docs §4) ---
    vocab_size: int = 256                 # byte-level lab vocabulary (V4: 129 280)
    d_model: int = 64                     # hidden size d ("dim")
    layer_types: list = field(default_factory=lambda: ["dense"] * 2)
    # one entry per layer from LAYER_TYPES; its length is the number of layers (docs §4 `compress_ratios`):
    # "dense" = full causal attention over uncompressed entries (the baseline arm), "swa" = window only,
    # "csa" = window + overlapping m-compressor + indexer top-k, "hca" = window + all m'-compressed entries
    max_seq_len: int = 512                # longest position the RoPE tables / caches are built for
    norm_eps: float = 1e-6                # every RMSNorm (docs §0)
    init_std: float = 0.02                # N(0, std) for linear weights (UNCONFIRMED, docs §10 / App. D.2)

    # --- attention, shared by all layer types (docs §2.1, 2.2, 2.5-2.7) ---
    n_heads: int = 4                      # query heads n_h
    head_dim: int = 32                    # c (V4: 512); one shared K = V head (MQA)
    rope_head_dim: int = 16               # r, the *last* r dims of a head are RoPE'd, interleaved pairs (docs §2.6)
    q_lora_rank: int = 32                 # d_c of the low-rank query (wq_a -> q_norm -> wq_b); 0 = plain wq (off)
    qk_norm: bool = True                  # per-head weightless q RMSNorm + kv_norm (docs §2.1-2.2); False = off
    attn_sink: bool = True                # learned per-head sink logit in the softmax denominator (docs §2.5)
    output_rope: bool = True              # de-rotate the output's RoPE dims at the query position (docs §2.6)
    o_groups: int = 2                     # g of the grouped low-rank output projection (docs §2.7); 0 = plain wo
    o_lora_rank: int = 32                 # d_g per group (docs §2.7)
    window: int = 16                      # n_win: window entries t-n_win+1..t incl. t (docs §2.5; V4 128)
    window_branch: bool = True            # keep the window branch in CSA/HCA layers (docs/methodology.md §3.4); False = off
    rope_theta: float = 10000.0           # base for dense / SWA-only layers and the MTP block, no YaRN (docs §2.6)
    compress_rope_theta: float = 160000.0  # base for CSA / HCA layers (docs §2.6)
    yarn_factor: float = 16.0             # YaRN on CSA / HCA layers (docs §2.6); 1 = off
    yarn_original_seq_len: int = 65536    # L0 of YaRN (docs §2.6)
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0

    # --- compressors (docs §2.3, §3) ---
    csa_ratio: int = 4                    # m of CSA (docs §2.3)
    hca_ratio: int = 16                   # m' of HCA (docs §3; V4 128, tiny presets 8-16)
    compressor_overlap: bool = True       # CSA's two-series 8-slot overlapping pool; False = plain m-token pool

    # --- lightning indexer (docs §2.4, §10) ---
    index_n_heads: int = 4                # n_h^I (V4 64)
    index_head_dim: int = 16              # c^I (V4 128)
    index_topk: int = 4                   # top-k compressed entries per query (Flash 512, Pro 1024)
    index_mode: str = "learned"           # learned | oracle (true top-k of main scores) | random | all
    index_hadamard: bool = True           # Hadamard rotation of indexer q and k (docs §2.4); False = off
    index_score_dtype: str = "fp32"       # fp32 | bf16: scores rounded to bf16 before the top-k (V4, docs §2.4)
    indexer_loss_weight: float = 1.0      # weight of the KL indexer loss (V3.2 recipe, docs §10); 0 = off
    indexer_warmup_steps: int = 0         # steps of the dense warm-up stage (main model frozen, docs §10)

    # --- residual stream (docs §1) ---
    residual: str = "plain"               # plain | hc | mhc
    hc_mult: int = 4                      # n_hc streams
    hc_sinkhorn_iters: int = 20           # T of the Sinkhorn projection (docs §1.2)
    hc_eps: float = 1e-6                  # eps of pre, Sinkhorn and hc_head (docs §1.2)
    hc_alpha_init: float = 0.01           # alpha^{pre,post,res} init (UNCONFIRMED, docs §1.4)
    hc_res_diag_init: float = 4.0         # diagonal of S^res at init so P ~ I (UNCONFIRMED, docs §1.4)
    hc_fn_init_std: float = 0.02          # std of the 24-way projection W (docs §1.4)

    # --- feed-forward: dense SwiGLU or DeepSeekMoE (docs §5) ---
    ffn: str = "dense"                    # dense | moe
    d_ff: int = 128                       # intermediate size of the dense SwiGLU FFN
    n_routed_experts: int = 8             # N_r
    n_activated_experts: int = 2          # K_r
    n_shared_experts: int = 1             # shared experts (0 = off)
    moe_inter_dim: int = 32               # I, routed and shared experts
    score_func: str = "sqrtsoftplus"      # sqrtsoftplus | sigmoid (docs §5.1)
    route_scale: float = 1.5              # routed weights sum to route_scale (Flash 1.5, Pro 2.5)
    n_hash_layers: int = 0                # first MoE layers routed by the fixed tid2eid table (docs §5.2)
    hash_seed: int = 0                    # seed of the balanced tid2eid table (UNCONFIRMED hash, docs §5.2)
    swiglu_limit: float = 10.0            # clamp of routed experts before SiLU (docs §5.3); 0 = off
    shared_expert_clamp: bool = False     # HF-compat: HF also clamps the shared expert (docs/hf_parity.md 9c); spec: False
    bias_update_speed: float = 1e-3       # aux-loss-free bias step gamma (docs §5.1.5); 0 = off
    balance_loss_weight: float = 1e-4     # sequence-wise balance loss alpha (docs §5.1.6); 0 = off
    anticipatory: str = "off"             # off | always | auto (docs §10)
    anticipatory_delta: int = 1           # Delta t: steps between the routing parameters and the current ones
    anticipatory_period: int = 50         # steps anticipatory routing stays on after a detected spike (auto)
    spike_factor: float = 1.5             # a loss > spike_factor x running median counts as a spike (auto)
    moe_dispatch: str = "grouped"         # grouped (tokens sorted by expert, 2 grouped GEMMs) | loop (per-expert reference)

    # --- multi-token prediction (docs §9) ---
    mtp_depth: int = 0                    # 0 = off
    mtp_loss_weight: float = 0.3          # lambda, 0.3 then mtp_loss_weight_decay from the LR decay (docs §4)
    mtp_loss_weight_decay: float = 0.1

    # --- low precision and kernels (docs §8) ---
    quant: str = "none"                   # none | fp8 | fp4 (QAT fake-quantisation, docs §8.4)
    kernels: str = "auto"                 # auto (Triton on CUDA, torch on CPU) | triton | torch

    # ------------------------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layer_types)

    @classmethod
    def from_preset(cls, name: str = "tiny", **overrides) -> "ModelConfig":
        if name not in MODEL_PRESETS:
            raise _err("preset", name, f"one of {sorted(MODEL_PRESETS)}")
        base = dict(MODEL_PRESETS[name])
        if "n_layers" in overrides and "layer_types" not in overrides and "layer_types" in base:
            overrides = dict(overrides)
            base["layer_types"] = _resize_schedule(base["layer_types"], _coerce("n_layers", overrides.pop("n_layers"), int))
        return cls.from_dict({**base, **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        if "n_layers" in d:                      # n_layers=N re-sizes a single-type or Flash/Pro-like schedule
            n = _coerce("n_layers", d.pop("n_layers"), int)
            types = parse_layer_types(d.get("layer_types", cls.__dataclass_fields__["layer_types"].default_factory()))
            d["layer_types"] = types if len(types) == n else _resize_schedule(types, n)
        _check_keys(cls, d)
        return cls(**{k: _coerce(k, v, _field_type(cls, k)) for k, v in d.items()})

    def __post_init__(self):
        if not isinstance(self.layer_types, list):
            self.layer_types = parse_layer_types(self.layer_types)
        self.validate()

    def validate(self) -> None:
        _check_types(self)
        if not self.layer_types:
            raise _err("layer_types", self.layer_types, "a non-empty list (one entry per layer)")
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                raise _err(f"layer_types[{i}]", t, f"one of {LAYER_TYPES}")
        pos = ["vocab_size", "d_model", "max_seq_len", "n_heads", "head_dim", "window", "csa_ratio", "hca_ratio",
               "index_n_heads", "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters", "d_ff",
               "n_routed_experts", "n_activated_experts", "moe_inter_dim", "anticipatory_period"]
        for k in pos:
            if getattr(self, k) <= 0:
                raise _err(k, getattr(self, k), "a positive integer")
        for k in ["q_lora_rank", "o_groups", "o_lora_rank", "n_shared_experts", "n_hash_layers", "mtp_depth",
                  "indexer_warmup_steps", "anticipatory_delta"]:
            if getattr(self, k) < 0:
                raise _err(k, getattr(self, k), "an integer >= 0")
        for k in ["norm_eps", "init_std", "rope_theta", "compress_rope_theta", "hc_eps"]:
            if not getattr(self, k) > 0:
                raise _err(k, getattr(self, k), "a positive number")
        for k in ["swiglu_limit", "bias_update_speed", "balance_loss_weight", "indexer_loss_weight",
                  "mtp_loss_weight", "mtp_loss_weight_decay", "hc_alpha_init", "hc_fn_init_std"]:
            if getattr(self, k) < 0:
                raise _err(k, getattr(self, k), "a number >= 0")
        if self.yarn_factor < 1:
            raise _err("yarn_factor", self.yarn_factor, "a number >= 1 (1 = YaRN off)")
        if self.rope_head_dim < 0 or self.rope_head_dim % 2:
            raise _err("rope_head_dim", self.rope_head_dim, "an even integer >= 0 (interleaved pairs)")
        if self.rope_head_dim > self.head_dim:
            raise _err("rope_head_dim", self.rope_head_dim, f"at most head_dim = {self.head_dim}")
        if self.o_groups and self.n_heads % self.o_groups:
            raise _err("o_groups", self.o_groups, f"a divisor of n_heads = {self.n_heads} (or 0 = plain wo)")
        if self.o_groups and self.o_lora_rank <= 0:
            raise _err("o_lora_rank", self.o_lora_rank, "a positive integer when o_groups > 0")
        if self.index_hadamard and self.index_head_dim & (self.index_head_dim - 1):
            raise _err("index_head_dim", self.index_head_dim,
                       "a power of two when index_hadamard=True (Sylvester Hadamard)")
        if self.index_head_dim < self.rope_head_dim:
            raise _err("index_head_dim", self.index_head_dim, f">= rope_head_dim = {self.rope_head_dim}")
        max_entries = self.max_seq_len // self.csa_ratio
        if "csa" in self.layer_types and self.index_topk > max_entries:
            raise _err("index_topk", self.index_topk,
                       f"at most max_seq_len // csa_ratio = {max_entries} (the number of compressed entries)")
        if self.n_activated_experts > self.n_routed_experts:
            raise _err("n_activated_experts", self.n_activated_experts,
                       f"at most n_routed_experts = {self.n_routed_experts}")
        if self.n_hash_layers > self.n_layers:
            raise _err("n_hash_layers", self.n_hash_layers, f"at most the number of layers = {self.n_layers}")
        choices = {"index_mode": ("learned", "oracle", "random", "all"), "residual": ("plain", "hc", "mhc"),
                   "ffn": ("dense", "moe"), "score_func": ("sqrtsoftplus", "sigmoid"),
                   "anticipatory": ("off", "always", "auto"), "quant": ("none", "fp8", "fp4"),
                   "kernels": ("auto", "triton", "torch"), "moe_dispatch": ("grouped", "loop"),
                   "index_score_dtype": ("fp32", "bf16")}
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise _err(k, getattr(self, k), f"one of {allowed}")
        if self.anticipatory != "off" and self.ffn != "moe":
            raise _err("anticipatory", self.anticipatory, "'off' unless ffn='moe' (it freezes expert routing)")
        if self.spike_factor <= 1:
            raise _err("spike_factor", self.spike_factor, "a number > 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **kw})


def _resize_schedule(types, n: int) -> list[str]:
    types = list(types)
    if n <= 0:
        raise _err("n_layers", n, "a positive integer")
    if types == flash_layer_types(len(types)):
        return flash_layer_types(n)
    if types == pro_layer_types(len(types)):
        return pro_layer_types(n)
    if len(set(types)) == 1:
        return [types[0]] * n
    raise _err("n_layers", n, f"only with a single-type, Flash-like or Pro-like layer_types (got {types}); "
                              "give layer_types instead")


# ---------------------------------------------------------------------------------------------------------------
# Presets (docs §4 for flash / pro)
# ---------------------------------------------------------------------------------------------------------------

MODEL_PRESETS: dict[str, dict] = {
    # CPU / CI, seconds per step at seq 128: DeepSeek-V4 in miniature (window-only layer, then CSA / HCA / CSA;
    # mHC residual; DeepSeekMoE with one hash-routed layer; MTP depth 1)
    "tiny": dict(layer_types=["swa", "csa", "hca", "csa"], residual="mhc", ffn="moe", n_hash_layers=1, mtp_depth=1),
    # the baseline arm of the same size: dense causal attention, plain residual, dense SwiGLU, no MTP
    "tiny-dense": dict(layer_types=["dense"] * 4, residual="plain", ffn="dense", n_hash_layers=0, mtp_depth=0),
    # one GPU, ~10-30M parameters: DeepSeek-V4 at lab size (Flash-like schedule swa, swa, csa, hca, ...; mHC; MoE
    # with one hash-routed layer; MTP depth 1); the attention shapes of docs/kernels.md (H 8 x 128, H_I 4 x 64, k 512)
    "small": dict(
        d_model=384, layer_types=flash_layer_types(8), max_seq_len=65536, n_heads=8, head_dim=128,
        rope_head_dim=64, q_lora_rank=256, o_groups=4, o_lora_rank=256, window=128, csa_ratio=4, hca_ratio=128,
        index_n_heads=4, index_head_dim=64, index_topk=512, d_ff=1024, residual="mhc", ffn="moe",
        n_routed_experts=16, n_activated_experts=2, moe_inter_dim=256, n_hash_layers=1, mtp_depth=1),
    # the baseline arm of the same size: dense causal attention (SDPA; no sink), plain residual, dense SwiGLU, no MTP
    "small-dense": dict(
        d_model=384, layer_types=["dense"] * 8, max_seq_len=65536, n_heads=8, head_dim=128, rope_head_dim=64,
        q_lora_rank=256, o_groups=4, o_lora_rank=256, window=128, csa_ratio=4, hca_ratio=128, index_n_heads=4,
        index_head_dim=64, index_topk=512, attn_sink=False, d_ff=1024, residual="plain",
        ffn="dense", n_hash_layers=0, mtp_depth=0),
    # full paper shapes, accounting only (docs §4)
    "flash": dict(
        vocab_size=129280, d_model=4096, layer_types=flash_layer_types(43), max_seq_len=1048576, n_heads=64,
        head_dim=512, rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024, window=128, csa_ratio=4,
        hca_ratio=128, index_n_heads=64, index_head_dim=128, index_topk=512, residual="mhc", ffn="moe",
        n_routed_experts=256, n_activated_experts=6, n_shared_experts=1, moe_inter_dim=2048, route_scale=1.5,
        n_hash_layers=3, mtp_depth=1, quant="fp4"),
    "pro": dict(
        vocab_size=129280, d_model=7168, layer_types=pro_layer_types(61), max_seq_len=1048576, n_heads=128,
        head_dim=512, rope_head_dim=64, q_lora_rank=1536, o_groups=16, o_lora_rank=1024, window=128, csa_ratio=4,
        hca_ratio=128, index_n_heads=64, index_head_dim=128, index_topk=1024, residual="mhc", ffn="moe",
        n_routed_experts=384, n_activated_experts=6, n_shared_experts=1, moe_inter_dim=3072, route_scale=2.5,
        n_hash_layers=3, mtp_depth=1, quant="fp4"),
}


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    run_dir: str = "runs/default"         # config.json, env.json, metrics.jsonl, ckpt.pt land here
    seed: int = 0
    data: str = "stdlib"                  # stdlib | shakespeare | retrieval | mrcr (see dsv4_lab/data)
    seq_len: int = 128
    batch_size: int = 8                   # sequences per optimizer step (global, split over DDP ranks)
    max_steps: int = 200                  # the horizon: fixes the LR schedule, never early stopping
    lr: float = 3e-3
    min_lr_ratio: float = 0.1             # final LR = lr * min_lr_ratio
    warmup_steps: int = -1                # linear warm-up steps; -1 = max_steps // 10
    schedule: str = "cosine"              # cosine (warm-up + cosine) | wsd (warm-up, stable, decay)
    wsd_decay_frac: float = 0.2           # fraction of max_steps spent in the WSD decay
    optimizer: str = "adamw"              # adamw | muon (docs §7)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    ns_schedule: str = "v4"               # Muon Newton-Schulz: v4 (8 + 2 hybrid steps) | keller5 (docs §7)
    muon_momentum: float = 0.95           # Muon mu, Nesterov (docs §7)
    muon_rms_scale: float = 0.18          # Muon update RMS gamma: NS(.) * sqrt(max(n, m)) * gamma (docs §7)
    muon_adam_eps: float = 1e-20          # eps of the AdamW part when optimizer=muon (paper §2.4, docs §7)
    grad_clip: float = 1.0                # 0 = off
    eval_interval: int = 50               # steps between validations (and always at the last step)
    eval_batches: int = 4
    log_interval: int = 10
    ckpt_interval: int = 50               # steps between checkpoints (and always at the last step)
    device: str = "auto"                  # auto | cpu | cuda
    parallel: str = "ddp"                 # under torchrun: ddp (replicated) | fsdp2 (sharded per block, parallel.py)
    dtype: str = "auto"                   # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    compile: str = "auto"                 # auto (blocks on CUDA for long runs: compilation.py) | true | blocks | false
    deterministic: bool = False           # bitwise-repeatable runs; on CUDA needs kernels=torch compile=false (docs §6.5)
    cuda_graph: bool = False              # forward + backward replayed from a CUDA graph; same numbers (cuda_graph.py)
    progress: bool = True                 # tqdm progress bar
    # synthetic long-range tasks (dsv4_lab/data/synthetic.py)
    task_n_pairs: int = 8                 # key-value pairs per retrieval sequence
    task_n_queries: int = 4               # queries per sequence
    task_n_needles: int = 3               # MRCR-like: needles per type (3 types)
    task_mrcr_queries: int = 1            # MRCR-like: queries per sequence, each about a different needle
    task_n_near: int = 0                  # retrieval: pairs placed just before the queries (short distance)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        _check_keys(cls, d)
        return cls(**{k: _coerce(k, v, _field_type(cls, k)) for k, v in d.items()})

    def __post_init__(self):
        if isinstance(self.compile, bool):    # compile=True / False from Python code
            self.compile = "true" if self.compile else "false"
        _check_types(self)
        for k in ["seq_len", "batch_size", "max_steps", "eval_interval", "eval_batches", "log_interval",
                  "ckpt_interval", "task_n_pairs", "task_n_queries", "task_n_needles", "task_mrcr_queries"]:
            if getattr(self, k) <= 0:
                raise _err(k, getattr(self, k), "a positive integer")
        if self.task_mrcr_queries > 3 * self.task_n_needles:
            raise _err("task_mrcr_queries", self.task_mrcr_queries,
                       f"an integer in [1, 3 x task_n_needles = {3 * self.task_n_needles}] (one query per needle at most)")
        if self.task_n_near < 0 or self.task_n_near > self.task_n_pairs:
            raise _err("task_n_near", self.task_n_near, f"an integer in [0, task_n_pairs={self.task_n_pairs}]")
        if self.warmup_steps == -1:
            self.warmup_steps = self.max_steps // 10
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise _err("warmup_steps", self.warmup_steps, f"-1 (auto) or an integer in [0, max_steps={self.max_steps}]")
        if not str(self.run_dir).strip():
            raise _err("run_dir", self.run_dir, "a directory path, e.g. run_dir=runs/my_run")
        if self.seed < 0:
            raise _err("seed", self.seed, "an integer >= 0")
        if not 0 < self.lr <= 1:
            raise _err("lr", self.lr, "a number in (0, 1] (AdamW and Muon steps of more than 1 per weight diverge)")
        for k in ("weight_decay", "grad_clip"):
            if getattr(self, k) < 0:
                raise _err(k, getattr(self, k), "a number >= 0")
        for k in ("beta1", "beta2"):
            if not 0 <= getattr(self, k) < 1:
                raise _err(k, getattr(self, k), "a number in [0, 1)")
        if not self.adam_eps > 0:
            raise _err("adam_eps", self.adam_eps, "a positive number")
        if not 0 <= self.muon_momentum < 1:
            raise _err("muon_momentum", self.muon_momentum, "a number in [0, 1)")
        if not self.muon_rms_scale > 0 or not self.muon_adam_eps > 0:
            k = "muon_rms_scale" if not self.muon_rms_scale > 0 else "muon_adam_eps"
            raise _err(k, getattr(self, k), "a positive number")
        if not 0 <= self.min_lr_ratio <= 1:
            raise _err("min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        if not 0 < self.wsd_decay_frac <= 1:
            raise _err("wsd_decay_frac", self.wsd_decay_frac, "a number in (0, 1]")
        choices = {"data": ("stdlib", "shakespeare", "retrieval", "mrcr"), "schedule": ("cosine", "wsd"),
                   "optimizer": ("adamw", "muon"), "ns_schedule": ("v4", "keller5"), "device": ("auto", "cpu", "cuda"),
                   "parallel": ("ddp", "fsdp2"),
                   "dtype": ("auto", "fp32", "bf16"), "compile": ("auto", "true", "blocks", "false")}
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise _err(k, getattr(self, k), f"one of {allowed}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# key=value overrides: model and train fields share one namespace
# ---------------------------------------------------------------------------------------------------------------

def parse_overrides(args: list[str] | dict) -> tuple[ModelConfig, TrainConfig]:
    """`["preset=tiny", "max_steps=40", "layer_types=csa,hca"]` -> (ModelConfig, TrainConfig)."""
    if isinstance(args, dict):
        kv = dict(args)
    else:
        kv = {}
        for a in args:
            if "=" not in a:
                raise ConfigError(f"override {a!r} is not of the form key=value (e.g. max_steps=40)")
            k, v = a.split("=", 1)
            kv[k.strip()] = v.strip()
    preset = kv.pop("preset", "tiny")
    mkeys = {f.name for f in fields(ModelConfig)} | {"n_layers"}
    tkeys = {f.name for f in fields(TrainConfig)}
    unknown = [k for k in kv if k not in mkeys | tkeys]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, sorted(mkeys | tkeys | {"preset"}), n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ConfigError(f"unknown config key '{k}' (value {kv[k]!r}){hint} "
                          "Known keys are the fields of ModelConfig and TrainConfig, plus 'preset'.")
    model = ModelConfig.from_preset(preset, **{k: v for k, v in kv.items() if k in mkeys})
    train = TrainConfig.from_dict({k: v for k, v in kv.items() if k in tkeys})
    check_train_pair(model, train)
    return model, train


BYTE_VOCAB = 256      # every data source (dsv4_lab/data) emits byte ids 0..255


def check_train_pair(model: "ModelConfig", train: "TrainConfig") -> None:
    """Constraints between the model and the training config."""
    if train.seq_len > model.max_seq_len:
        raise _err("seq_len", train.seq_len, f"at most max_seq_len = {model.max_seq_len} (or raise max_seq_len)")
    if model.vocab_size < BYTE_VOCAB:
        raise _err("vocab_size", model.vocab_size,
                   f">= {BYTE_VOCAB} for data={train.data!r} (byte ids 0..{BYTE_VOCAB - 1})")
    if train.cuda_graph and train.compile != "false":
        raise _err("compile", train.compile, "'false' with cuda_graph=true (the graph records the eager model)")


@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)          # slow (evaluates every annotation): once per class


def _field_type(cls, name):
    hints = _type_hints(cls)
    return hints.get(name, str)


def _check_keys(cls, d: dict):
    names = {f.name for f in fields(cls)}
    for k in d:
        if k not in names:
            close = difflib.get_close_matches(k, sorted(names), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ConfigError(f"unknown config key '{k}' for {cls.__name__} (value {d[k]!r}){hint}")


def _coerce(name, value, typ):
    """Turn CLI strings into the field's type; reject wrong types with a clear message."""
    if typ is list or typing.get_origin(typ) is list:
        return value if isinstance(value, list) else parse_layer_types(value)
    if isinstance(value, str):
        try:
            if typ is bool:
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if typ is int:
                f = float(value)
                if f != int(f):
                    raise ValueError
                return int(f)
            if typ is float:
                return float(value)
        except (ValueError, OverflowError):
            raise _err(name, value, f"a value of type {typ.__name__}") from None
        return value
    return value


def _check_types(obj):
    for f in fields(obj):
        v = getattr(obj, f.name)
        typ = _field_type(type(obj), f.name)
        ok = True
        if typ is bool:
            ok = isinstance(v, bool)
        elif typ is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif typ is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
            if ok:
                setattr(obj, f.name, float(v))
        elif typ is str:
            ok = isinstance(v, str)
        elif typ is list:
            ok = isinstance(v, list)
        if not ok:
            raise _err(f.name, v, f"a {'finite ' if typ is float else ''}value of type {typ.__name__}")

