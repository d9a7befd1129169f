"""Fuzz the CLI with seeded random bad input (issue 12 part 4): unknown keys, values of the wrong type or range,
malformed arguments, bad run_dir paths, and garbage written over config.json / ckpt.pt / metrics.jsonl of a
finished run. Every case must exit 2 with exactly one `error: ...` line (warning lines aside), print no result,
raise nothing (no traceback) and leave the run dir as it was. Runs in-process: the whole fuzz takes seconds."""
import dataclasses
import random
import shutil
import string
import typing
from pathlib import Path

import pytest

from dsv4_lab import cli
from dsv4_lab.config import ModelConfig, TrainConfig

SEED = 1234
FAST = ["preset=tiny-dense", "progress=false", "seq_len=32", "batch_size=2", "eval_batches=1", "log_interval=1",
        "max_steps=3", "eval_interval=3"]
TINY = ["preset=tiny", *FAST[1:]]         # the bad override comes last and wins; a silent accept stays tiny

BAD_INT = ["abc", "1.5", "inf", "-inf", "nan", "", "1e400", "0x1f", "[3]", "None", "3 4", "½", "true"]
BAD_FLOAT = ["abc", "inf", "-inf", "nan", "", "1e999", "1,5", "--1", "0x", "[0.1]"]
BAD_BOOL = ["maybe", "2", "", "tru", "nan", "-1", "yes please", "0.5"]
BAD_LAYERS = ["csa,foo", "", "flash:x", "dense*abc", "[]", "moe", "pro", "csa*0", ",,", "swa,,mla"]
FREE_STR = {"run_dir"}                                    # str fields without a fixed set of choices
# (key, value) pairs outside the allowed range, for preset=tiny (CSA, HCA, MoE, max_seq_len 512, 4 heads)
OUT_OF_RANGE = [
    ("seq_len", "1000"), ("seq_len", "513"), ("seq_len", "0"), ("seq_len", "-8"), ("vocab_size", "100"),
    ("vocab_size", "255"), ("vocab_size", "0"), ("lr", "1e6"), ("lr", "2"), ("lr", "0"), ("lr", "-0.1"),
    ("max_steps", "0"), ("max_steps", "-3"), ("batch_size", "0"), ("warmup_steps", "500"), ("warmup_steps", "-2"),
    ("min_lr_ratio", "1.5"), ("min_lr_ratio", "-0.1"), ("beta1", "1"), ("beta2", "1.5"), ("beta1", "-0.2"),
    ("muon_momentum", "1"), ("wsd_decay_frac", "0"), ("wsd_decay_frac", "1.2"), ("rope_head_dim", "15"),
    ("rope_head_dim", "64"), ("index_head_dim", "24"), ("n_activated_experts", "9"), ("o_groups", "3"),
    ("spike_factor", "1"), ("yarn_factor", "0.5"), ("seed", "-1"), ("task_n_near", "9"), ("index_topk", "1000"),
    ("n_hash_layers", "9"), ("d_model", "0"), ("n_heads", "-4"), ("window", "0"), ("csa_ratio", "0"),
    ("hc_mult", "0"), ("norm_eps", "0"), ("init_std", "-1"), ("rope_theta", "0"), ("grad_clip", "-1"),
    ("weight_decay", "-0.1"), ("adam_eps", "0"), ("eval_batches", "0"), ("ckpt_interval", "0"), ("n_layers", "0"),
    ("mtp_depth", "-1"), ("swiglu_limit", "-1"), ("muon_rms_scale", "0"), ("d_ff", "-1"), ("hca_ratio", "0"),
]


def _fields():
    out = {}
    for cls in (ModelConfig, TrainConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f.name] = hints[f.name]
    return out


def _junk(rng, n=None):
    n = n if n is not None else rng.randint(1, 12)
    return "".join(rng.choice(string.ascii_letters + string.digits + "_-.,:*/ ") for _ in range(n)).strip() or "x"


def _wrong_type_case(rng, fields):
    k = rng.choice(sorted(f for f in fields if f not in FREE_STR))
    t = fields[k]
    if t is int:
        v = rng.choice(BAD_INT)
    elif t is float:
        v = rng.choice(BAD_FLOAT)
    elif t is bool:
        v = rng.choice(BAD_BOOL)
    elif t is str:
        v = "zz" + _junk(rng)                             # no choice starts with "zz"
    else:
        v = rng.choice(BAD_LAYERS)
    return [f"{k}={v}"]


def _cases(rng, n_each):
    """(label, argv-without-run_dir, damage) triples; damage(run_dir) prepares a copy of a finished run or None."""
    fields = _fields()
    names = set(fields) | {"preset", "n_layers"}
    cases = []
    for _ in range(n_each["unknown"]):
        k = "".join(rng.choice(string.ascii_lowercase + "_") for _ in range(rng.randint(2, 12)))
        if k in names:
            k += "_zz"
        cases.append(("unknown key", ["train", *TINY, f"{k}={_junk(rng)}"], None))
    for _ in range(n_each["type"]):
        cases.append(("wrong type", ["train", *TINY, *_wrong_type_case(rng, fields)], None))
    for k, v in rng.sample(OUT_OF_RANGE, len(OUT_OF_RANGE)):
        cases.append(("out of range", ["train", *TINY, f"{k}={v}"], None))
    for a in ["noequals", "=3", "==", "max_steps", "preset", "=", " =1"]:
        cases.append(("malformed", ["train", *TINY, a], None))
    cases.append(("preset", ["train", *FAST, f"preset={_junk(rng)}zz"], None))
    cases.append(("anticipatory without moe", ["train", *FAST, "anticipatory=always"], None))
    for cmd in ["trian", "run", "--version", "figurez"]:
        cases.append(("unknown command", [cmd], None))
    for _ in range(n_each["reproduce"]):
        k = rng.choice(["sweeps", "rooot", "figure", _junk(rng, 5).replace("=", "")])
        cases.append(("reproduce", ["reproduce", f"{k}=x"], None))
    cases += [("reproduce", ["reproduce", "runs"], None), ("reproduce", ["reproduce", "sweep="], None),
              ("reproduce", ["reproduce", f"sweep=/nonexistent/{_junk(rng, 6)}.json"], None)]
    for _ in range(n_each["files"]):
        cases.append(("run dir", ["train", *FAST], _damage(rng)))
    return cases


def _damage(rng):
    """A random way to break a finished run dir so that it must be refused."""
    kind = rng.choice(["config_bytes", "config_json", "ckpt_bytes", "ckpt_cut", "ckpt_flip", "ckpt_empty",
                       "metrics_bytes", "metrics_cut", "metrics_mid", "metrics_empty", "no_config", "other_config",
                       "path_file", "path_under_file", "path_proc"])
    blob = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))

    def apply(rd: Path) -> Path:
        cfg, ck, m = rd / "config.json", rd / "ckpt.pt", rd / "metrics.jsonl"
        if kind == "config_bytes":
            cfg.write_bytes(blob)
        elif kind == "config_json":
            cfg.write_text(rng.choice(["{}", "[]", "null", "1", '{"model": 1, "train": {}}', '{"train": {}}', '"x"']))
        elif kind == "ckpt_bytes":
            ck.write_bytes(blob)
        elif kind == "ckpt_cut":
            b = ck.read_bytes()
            ck.write_bytes(b[: rng.randrange(len(b))])
        elif kind == "ckpt_flip":
            b = bytearray(ck.read_bytes())
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
            ck.write_bytes(bytes(b))
        elif kind == "ckpt_empty":
            ck.write_bytes(b"")
        elif kind == "metrics_bytes":
            m.write_bytes(blob)
        elif kind == "metrics_cut":                       # the final record damaged or lost
            b = m.read_bytes()
            m.write_bytes(b[: rng.randrange(len(b) - 1)])
        elif kind == "metrics_mid":
            lines = m.read_text().splitlines()
            lines.insert(rng.randrange(len(lines)), rng.choice(["garbage", "{", '{"step": "x"}', "[]", '{"a": 1}']))
            m.write_text("\n".join(lines) + "\n")
        elif kind == "metrics_empty":
            m.write_text("")
        elif kind == "no_config":
            cfg.unlink()
        elif kind == "other_config":
            import json
            d = json.loads(cfg.read_text())
            d["train"]["lr"] = 0.0123
            cfg.write_text(json.dumps(d))
        elif kind == "path_file":
            return ck
        elif kind == "path_under_file":
            return ck / "sub"
        elif kind == "path_proc":
            return Path("/proc") / f"dsv4_fuzz_{rng.randrange(10**6)}"
        return rd
    apply.kind = kind
    return apply


def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.is_dir() else {}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    rd = tmp_path_factory.mktemp("fuzz_base") / "run"
    assert cli.main(["train", *FAST, f"run_dir={rd}"]) == 0
    return rd


def test_fuzz_cli_bad_inputs(finished, tmp_path, capsys):
    rng = random.Random(SEED)
    cases = _cases(rng, {"unknown": 40, "type": 70, "reproduce": 12, "files": 60})
    assert len(cases) >= 200
    capsys.readouterr()
    silent, tracebacks, not_one_line, touched = [], [], [], []
    for i, (label, argv, damage) in enumerate(cases):
        rd = tmp_path / f"case{i}"
        argv = list(argv)
        if damage is not None:
            shutil.copytree(finished, rd)
            target = damage(rd)
            label = f"{label}/{damage.kind}"
        else:
            target = rd
        if argv[0] == "train":
            argv.append(f"run_dir={target}")
        before = _snapshot(rd)
        try:
            rc = cli.main(argv)
        except BaseException as e:                        # an exception here is a traceback for the user
            capsys.readouterr()
            tracebacks.append((label, argv[-2:], f"{type(e).__name__}: {e}"))
            continue
        out, err = capsys.readouterr()
        errors = [ln for ln in err.splitlines() if not ln.startswith("warning: ")]
        if rc != 2:
            silent.append((label, argv[-2:], rc, out[:100]))
        elif len(errors) != 1 or not errors[0].startswith("error: ") or out.strip():
            not_one_line.append((label, argv[-2:], err[-300:], out[:100]))
        if _snapshot(rd) != before:
            touched.append((label, argv[-2:]))
    assert not tracebacks, tracebacks[:5]
    assert not silent, silent[:5]
    assert not not_one_line, not_one_line[:5]
    assert not touched, touched[:5]
