"""Preemptible generation (dsv4_lab/inference/wal.py, docs §6.6): generate(..., wal=path) killed with a real SIGKILL
at several points, and rerun with the same log, returns exactly the tokens of an uninterrupted run (greedy and
seeded sampling; 0 steps lost or duplicated in the log); a record torn by a kill mid-write is dropped; a log from
another model / prompt / settings, or a damaged one, is refused. Then the length-bias simulation.

The child processes load the parent's model from a state file and use the parent's intra-op thread count, so the
child's and the parent's arithmetic are the same; every comparison of tokens is torch.equal.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dsv4_lab import DSV4LM, ModelConfig
from dsv4_lab.inference.generate import generate
from dsv4_lab.inference.wal import WALError, length_bias_simulation, read_wal

N_NEW = 24
SAMPLING = dict(temperature=1.0, top_k=20)

CHILD = textwrap.dedent('''
    import os, sys, time, signal, torch
    torch.set_num_threads(int(sys.argv[5]))
    from dsv4_lab import DSV4LM, ModelConfig
    from dsv4_lab.inference import wal as W
    from dsv4_lab.inference.generate import generate
    blob = torch.load(sys.argv[1], weights_only=True)
    model = DSV4LM(ModelConfig.from_dict(blob["cfg"])).eval()
    model.load_state_dict(blob["state"])
    mode, tear_at = sys.argv[3], int(sys.argv[4])
    append = W.WAL.append
    def slow_append(self, step, tokens, gen):           # slow enough for the parent to kill mid-generation
        if step == tear_at:                             # write half of this record, make it durable, die
            data = W._line({"step": step, "tokens": tokens.tolist(), "rng": None})
            os.write(self.fd, data[: len(data) // 2]); os.fsync(self.fd)
            os.kill(os.getpid(), signal.SIGKILL)
        append(self, step, tokens, gen)
        time.sleep(0.02)
    W.WAL.append = slow_append
    kw = dict(temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(1234)) if mode == "sample" else {}
    generate(model, blob["prompt"], int(sys.argv[6]), wal=sys.argv[2], **kw)
''')


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("wal")
    cfg = ModelConfig.from_preset("tiny", window=8, csa_ratio=4, hca_ratio=8, max_seq_len=64, index_topk=16)
    torch.manual_seed(0)
    model = DSV4LM(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 9))
    torch.save({"cfg": cfg.to_dict(), "state": model.state_dict(), "prompt": prompt}, d / "model.pt")
    (d / "child.py").write_text(CHILD)
    ref = {"greedy": generate(model, prompt, N_NEW),
           "sample": generate(model, prompt, N_NEW, generator=torch.Generator().manual_seed(1234), **SAMPLING)}
    return d, model, prompt, ref


def n_records(path) -> int:
    """Whole step records in the log; -1 while it has no header yet."""
    try:
        return path.read_bytes().count(b"\n") - 1
    except FileNotFoundError:
        return -1


def run_child(setup, wal, mode, kill_at=None, tear_at=-1):
    """Start a child generating with `wal`; SIGKILL it once the log holds >= kill_at records (0: right after the
    header, during the prefill; None: let it run until it tears itself). Returns the records on disk when it died."""
    d = setup[0]
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, str(d / "child.py"), str(d / "model.pt"), str(wal), mode, str(tear_at),
                          str(torch.get_num_threads()), str(N_NEW)], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 50
    while kill_at is not None and p.poll() is None and time.monotonic() < deadline:
        if n_records(wal) >= kill_at:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
    assert rc == -signal.SIGKILL, f"child was not killed mid-generation (rc {rc}): {p.stderr.read().decode()[-800:]}"
    return n_records(wal)


def check_log(wal, ids, prompt_len):
    """The finished log holds steps 0 .. N_NEW-1 once each, and they are the returned tokens."""
    _, recs = read_wal(wal)
    assert [r["step"] for r in recs] == list(range(N_NEW))
    assert torch.equal(torch.tensor([r["tokens"] for r in recs]).T, ids[:, prompt_len:])


@pytest.mark.parametrize("kill_at", [0, 1, 11])
def test_greedy_killed_and_resumed(setup, tmp_path, kill_at):
    _, model, prompt, ref = setup
    wal = tmp_path / "g.wal"
    logged = run_child(setup, wal, "greedy", kill_at)
    assert logged < N_NEW
    ids = generate(model, prompt, N_NEW, wal=wal)
    assert torch.equal(ids, ref["greedy"])
    check_log(wal, ids, prompt.shape[1])


def test_sampling_killed_twice_and_resumed(setup, tmp_path):
    """Seeded sampling: killed at >= 3 records, resumed in a second child killed at >= 14, finished here with
    another seed (the log's RNG state wins over the generator's)."""
    _, model, prompt, ref = setup
    wal = tmp_path / "s.wal"
    first = run_child(setup, wal, "sample", 3)
    second = run_child(setup, wal, "sample", 14)
    assert 3 <= first <= second < N_NEW
    ids = generate(model, prompt, N_NEW, generator=torch.Generator().manual_seed(999), wal=wal, **SAMPLING)
    assert torch.equal(ids, ref["sample"])
    check_log(wal, ids, prompt.shape[1])


def test_torn_record_dropped(setup, tmp_path):
    _, model, prompt, ref = setup
    wal = tmp_path / "t.wal"
    run_child(setup, wal, "sample", None, tear_at=7)
    raw = wal.read_bytes()
    assert not raw.endswith(b"\n") and len(read_wal(wal)[1]) == 7          # half of step 7 is on disk
    ids = generate(model, prompt, N_NEW, generator=torch.Generator().manual_seed(5), wal=wal, **SAMPLING)
    assert torch.equal(ids, ref["sample"])
    check_log(wal, ids, prompt.shape[1])


def test_finished_log_returns_same(setup, tmp_path):
    _, model, prompt, ref = setup
    wal = tmp_path / "f.wal"
    a = generate(model, prompt, N_NEW, wal=wal)
    size = wal.stat().st_size
    b = generate(model, prompt, N_NEW, wal=wal)
    assert torch.equal(a, ref["greedy"]) and torch.equal(b, a) and wal.stat().st_size == size


def test_default_generator_resume(setup, tmp_path):
    """generator=None: the log holds the default generator's state, so a resume after a cut continues it exactly
    (the global seed set before the rerun does not matter)."""
    _, model, prompt, _ = setup
    torch.manual_seed(7)
    ref = generate(model, prompt, 10, **SAMPLING)
    wal = tmp_path / "n.wal"
    torch.manual_seed(7)
    generate(model, prompt, 10, wal=wal, **SAMPLING)
    lines = wal.read_bytes().split(b"\n")
    wal.write_bytes(b"\n".join(lines[:5]) + b"\n" + lines[5][:30])           # steps 0..3 + a torn step 4
    torch.manual_seed(99)
    assert torch.equal(generate(model, prompt, 10, wal=wal, **SAMPLING), ref)


def test_eos_resume(setup, tmp_path):
    """eos handling survives a resume: rows that ended keep emitting eos after the replay."""
    _, model, prompt, ref = setup
    eos = int(ref["greedy"][0, prompt.shape[1] + 2])                       # row 0 emits it at step 2
    full = generate(model, prompt, N_NEW, eos_id=eos)
    wal = tmp_path / "e.wal"
    generate(model, prompt, N_NEW, eos_id=eos, wal=wal)
    lines = wal.read_bytes().split(b"\n")
    wal.write_bytes(b"\n".join(lines[:5]) + b"\n")                           # header + steps 0..3 survive
    assert torch.equal(generate(model, prompt, N_NEW, eos_id=eos, wal=wal), full)
    assert (full[0, prompt.shape[1] + 2:] == eos).all()


def test_refuses_other_generation(setup, tmp_path):
    _, model, prompt, _ = setup
    wal = tmp_path / "r.wal"
    generate(model, prompt, 4, wal=wal)
    with pytest.raises(WALError, match="another prompt"):
        generate(model, prompt.flip(1), 4, wal=wal)
    with pytest.raises(WALError, match="temperature=0.0, this call has temperature=1.0"):
        generate(model, prompt, 4, temperature=1.0, wal=wal)
    with pytest.raises(WALError, match="max_new_tokens"):
        generate(model, prompt, 5, wal=wal)
    other = DSV4LM(model.cfg).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.head.weight[0, 0] += 1e-3
    with pytest.raises(WALError, match="another model"):
        generate(other, prompt, 4, wal=wal)


def test_other_environment_warns(setup, tmp_path, monkeypatch):
    """Another torch build / thread count is warned about, not refused: the logged tokens stay valid."""
    from dsv4_lab.inference import wal as W
    _, model, prompt, ref = setup
    wal = tmp_path / "w.wal"
    generate(model, prompt, N_NEW, wal=wal)
    monkeypatch.setattr(W, "_env", lambda: {"torch": "0.0", "threads": 99})
    with pytest.warns(UserWarning, match="continuation is only guaranteed"):
        assert torch.equal(generate(model, prompt, N_NEW, wal=wal), ref["greedy"])


def test_refuses_damaged_log(setup, tmp_path):
    _, model, prompt, _ = setup
    wal = tmp_path / "d.wal"
    generate(model, prompt, 6, wal=wal)
    lines = wal.read_bytes().split(b"\n")
    bad = lines[:3] + [lines[3].replace(b'"step":2', b'"step":7')] + lines[4:]  # CRC no longer matches
    wal.write_bytes(b"\n".join(bad))
    with pytest.raises(WALError, match="line 4 is not step 2"):
        generate(model, prompt, 6, wal=wal)
    head = lines[0].replace(b'"version":1', b'"version":9')
    import zlib
    body = head[9:]
    wal.write_bytes(f"{zlib.crc32(body):08x} ".encode() + body + b"\n")
    with pytest.raises(WALError, match="version 9 is not allowed"):
        generate(model, prompt, 6, wal=wal)
    wal.write_bytes(b"hello\n")
    with pytest.raises(WALError, match="not a generation wal header"):
        generate(model, prompt, 6, wal=wal)


# ---------------------------------------------------------------------------------------------------------------
# Length bias: restart-from-scratch shortens outputs, WAL resume does not
# ---------------------------------------------------------------------------------------------------------------

def test_length_bias_simulation():
    import numpy as np
    res = length_bias_simulation(n_generations=4000, preempt_prob=0.005, seed=0)
    L = res["lengths"]
    assert np.array_equal(L["wal"], L["uninterrupted"])                    # resume continues the same sample
    for k in ("uninterrupted", "restart"):
        # sample mean vs the analytic law's mean: within 5 standard errors of that law (n = 4000 draws)
        pmf = res["pmf"] if k == "uninterrupted" else res["pmf_restart"]
        Ls = np.arange(len(pmf))
        sd = np.sqrt((pmf * (Ls - res["analytic_mean"][k]) ** 2).sum())
        assert abs(res["mean"][k] - res["analytic_mean"][k]) < 5 * sd / np.sqrt(len(L[k])), k
    # the bias itself: analytic restart mean well below the uninterrupted one (65 vs 105 tokens here), sampled too
    assert res["analytic_mean"]["restart"] < 0.75 * res["analytic_mean"]["uninterrupted"]
    assert res["mean"]["restart"] < res["mean"]["uninterrupted"]
    assert res["preemptions"]["restart"] > 0 and res["wasted_decode"] > 0 and res["reprefill"] > 0
    none = length_bias_simulation(n_generations=500, preempt_prob=0.0, seed=1)
    assert np.array_equal(none["lengths"]["restart"], none["lengths"]["uninterrupted"])
    fig = __import__("dsv4_lab.inference.wal", fromlist=["x"]).plot_length_bias(res)
    assert len(fig.axes[0].lines) == 5
    with pytest.raises(ValueError, match="preempt_prob=1.5"):
        length_bias_simulation(preempt_prob=1.5)
