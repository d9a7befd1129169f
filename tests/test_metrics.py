"""The per-question metrics (dsv4_lab/metrics.py) and the distance split of the synthetic tasks."""
import math

import pytest
import torch

from dsv4_lab.data import synthetic
from dsv4_lab.metrics import amax_gain, diverged, run_metrics, shared_spikes, spike_starts, spikes, step_losses


def test_spike_definition():
    flat = [2.0] * 40
    assert spikes(flat) == {"spike_count": 0, "largest_jump": 0.0}
    # two separate events (one two steps long) above 1.2 x the running median of 2.0
    bumpy = flat[:25] + [2.5, 2.6] + flat[:10] + [3.0] + flat[:5]
    s = spikes(bumpy)
    assert s["spike_count"] == 2 and s["largest_jump"] == pytest.approx(1.0)
    assert spikes(flat[:25] + [2.39] + flat[:5])["spike_count"] == 0          # 2.39 < 1.2 x 2.0
    assert diverged([5.5] + [2.0] * 30) is False and diverged([5.5] + [6.0] * 30) is True
    assert diverged([5.5, float("nan")]) is True
    assert spike_starts(bumpy) == [25, 37]                   # where each event starts (the count's events)


def test_shared_spikes_tells_data_locked_from_arm_specific():
    assert shared_spikes([], [3, 9]) is None                 # no event: nothing to share
    assert shared_spikes([100, 200, 300], [101, 250]) == pytest.approx(1 / 3)   # within one step counts
    assert shared_spikes([100, 200], [100, 200, 500]) == 1.0
    assert shared_spikes([100, 200], [102, 198], tol=1) == 0.0


def test_amax_gain_of_residual_maps():
    B, T, n = 1, 3, 4
    eye = torch.eye(n).expand(B, T, n, n)
    assert amax_gain([eye] * 5) == pytest.approx(1.0)
    ds = torch.full((B, T, n, n), 1.0 / n)                       # doubly stochastic: every row/column sums to 1
    assert amax_gain([ds, eye, ds]) == pytest.approx(1.0)
    # an unconstrained map with row sums 1.5 compounds through depth: 1.5^4
    hc = eye * 1.5
    assert amax_gain([hc] * 4) == pytest.approx(1.5 ** 4)


def test_step_losses_and_run_metrics_from_records():
    recs = [{"step": 0, "losses": [5.0], "grad_norm_max": 3.0},
            {"step": 2, "losses": [4.0, 3.0], "grad_norm_max": 7.0, "val_loss": 3.1, "hc_composite_gain": 1.2}]
    assert step_losses(recs) == [5.0, 4.0, 3.0]
    m = run_metrics(recs)
    assert m["max_grad_norm"] == 7.0 and m["val_loss"] == 3.1 and m["hc_composite_gain_max"] == 1.2
    assert m["diverged"] == 0.0 and m["spike_count"] == 0
    assert "anticipatory_on" not in m                       # no MoE router reported: no such metric
    recs[0]["blocks.1.ffn.anticipatory_active"] = 0.0
    recs[1].update({"blocks.1.ffn.anticipatory_active": 0.0, "blocks.2.ffn.anticipatory_active": 1.0})
    assert run_metrics(recs)["anticipatory_on"] == 0.5      # on in one layer of one of two records


def test_retrieval_near_pairs_and_distance_split():
    window = 16
    x, y = synthetic.retrieval_batch(64, 128, n_pairs=6, n_queries=3, n_near=2, seed=3)
    d = synthetic.answer_distances(x, y)
    mask = y != -100
    near, far = (d[mask] <= window), (d[mask] > window)
    assert near.any() and far.any()
    assert d[mask][near].max() <= 2 * (2 + 3) and d[mask][far].min() > 64        # two clearly separated groups
    # n_near = 0 keeps the old sequences exactly (same random draws)
    a, _ = synthetic.retrieval_batch(2, 128, n_pairs=6, n_queries=3, seed=5)
    b, _ = synthetic.retrieval_batch(2, 128, n_pairs=6, n_queries=3, seed=5, n_near=0)
    assert torch.equal(a, b)
    # an oracle that answers only the near queries: near accuracy 1, far accuracy 0
    logits = torch.zeros(64, 128, 256)
    sel = mask & (d <= window)
    logits[sel, y[sel]] = 10.0
    acc = synthetic.answer_accuracy(logits, y, x, window)
    assert acc["answer_acc_near"] == 1.0 and acc["answer_acc_far"] == 0.0
    assert acc["n_answers_near"] + acc["n_answers_far"] == mask.sum().item()
    with pytest.raises(ValueError, match="task_n_near"):
        synthetic.retrieval_batch(1, 128, n_pairs=4, n_queries=2, n_near=5)


def test_mrcr_distance_is_query_to_needle():
    x, y = synthetic.mrcr_batch(8, 200, n_needles=3, n_types=2, needle_len=3, seed=2)
    d = synthetic.answer_distances(x, y)
    for b in range(8):
        s = x[b].tolist()
        qp = s.index(synthetic.QUERY)
        needle = qp - d[b][y[b] != -100][0].item()
        assert s[needle] == s[qp + 1]                                   # the asked needle's TYPE token
        ans = y[b][y[b] != -100].tolist()
        assert s[needle + 1: needle + 4] == ans                          # its content is the answer
    acc = synthetic.answer_accuracy(torch.zeros(8, 200, 256), y, x, 10_000)
    assert math.isnan(acc["answer_acc_far"]) and acc["n_answers_far"] == 0


def test_mrcr_several_queries_each_ask_a_different_needle():
    """n_queries queries after the haystack: each (TYPE, ORDINAL) asked once, each answer the content of the
    ORDINAL-th needle of that TYPE in the haystack, each answer's distance from its own query to that needle."""
    n_needles, n_types, L = 2, 3, 4
    x, y = synthetic.mrcr_batch(6, 160, n_needles=n_needles, n_types=n_types, needle_len=L, seed=7, n_queries=5)
    d = synthetic.answer_distances(x, y)
    for b in range(6):
        s = x[b].tolist()
        qps = [i for i, t in enumerate(s) if t == synthetic.QUERY]
        assert len(qps) == 5 and len({(s[q + 1], s[q + 2]) for q in qps}) == 5       # five different needles
        hay = s[: qps[0]]
        for q in qps:
            ty, ordinal = s[q + 1], s[q + 2] - synthetic.ORDINALS[0]
            needle = [i for i, t in enumerate(hay) if t == ty][ordinal]
            assert y[b, q + 2: q + 2 + L].tolist() == hay[needle + 1: needle + 1 + L]  # targets: the answer tokens
            assert d[b, q + 2: q + 2 + L].tolist() == [q - needle] * L
        assert int((y[b] != -100).sum()) == 5 * L
    with pytest.raises(ValueError, match="task_mrcr_queries=7"):
        synthetic.mrcr_batch(1, 160, n_needles=n_needles, n_types=n_types, n_queries=7)
