import numpy as np
import pytest
import torch

from dsv4_lab.data import Batches, load_stdlib, synthetic


def test_stdlib_corpus_deterministic_and_cached():
    tr1, va1, m1 = load_stdlib(max_bytes=2_000_000)
    tr2, va2, m2 = load_stdlib(max_bytes=2_000_000)      # from the cache
    assert m1 == m2 and np.array_equal(tr1, tr2) and np.array_equal(va1, va2)
    assert tr1.dtype == np.uint8 and tr1.size > 10 * va1.size > 0
    assert m1["n_files"] > 10


def test_batches_pure_function_of_seed_and_step():
    b1, b2 = Batches("stdlib", 64, 4, seed=3), Batches("stdlib", 64, 4, seed=3)
    x1, y1 = b1.train_batch(7)
    x2, y2 = b2.train_batch(7)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])                 # next-byte targets
    assert not torch.equal(b1.train_batch(8)[0], x1)
    assert not torch.equal(Batches("stdlib", 64, 4, seed=4).train_batch(7)[0], x1)
    assert torch.equal(b1.val_batch(0)[0], b2.val_batch(0)[0])


@pytest.mark.parametrize("kind", ["retrieval", "mrcr"])
def test_synthetic_tasks_answers_are_recoverable(kind):
    if kind == "retrieval":
        x, y = synthetic.retrieval_batch(4, 200, n_pairs=6, n_queries=3, seed=1)
    else:
        x, y = synthetic.mrcr_batch(4, 200, n_needles=3, n_types=2, needle_len=3, seed=1)
    assert x.shape == y.shape == (4, 200)
    for b in range(4):
        seq = x[b].tolist()
        for t in (y[b] != -100).nonzero().flatten().tolist():
            if kind == "retrieval":                            # answer = value following the same key earlier
                key = seq[t]
                first = seq.index(key)
                assert first < t and seq[first + 1] == y[b, t].item()
                assert t - first > 100                          # dependency distance beyond a short window
            else:
                assert synthetic.VALUES[0] <= y[b, t].item() < synthetic.VALUES[1]
    # an oracle "model" that puts all mass on the answers scores 1.0, a uniform one scores ~0
    logits = torch.zeros(4, 200, 256)
    m = y != -100
    logits[m, y[m]] = 10.0
    assert synthetic.answer_accuracy(logits, y) == {"answer_acc": 1.0, "exact_match": 1.0}
    assert synthetic.answer_accuracy(torch.zeros(4, 200, 256), y)["exact_match"] == 0.0


def test_synthetic_distance_control_and_errors():
    x, y = synthetic.retrieval_batch(1, 300, n_pairs=4, n_queries=2, distance=20, seed=0)
    t = (y[0] != -100).nonzero().flatten()[0].item()
    first = x[0].tolist().index(x[0, t].item())
    assert 20 <= t - first < 40
    with pytest.raises(ValueError, match="seq_len"):
        synthetic.retrieval_batch(1, 10, n_pairs=8, n_queries=4)


def test_prefetched_batches_are_the_same_batches():
    """The background-built next batch equals the batch built on demand, in order, after a jump (resume) and for
    validation; nothing is prefetched past the last step."""
    from dsv4_lab.data import Batches, Prefetched
    plain = Batches("retrieval", 64, 3, seed=5, task_n_pairs=4, task_n_queries=2, task_n_near=1)
    pre = Prefetched(Batches("retrieval", 64, 3, seed=5, task_n_pairs=4, task_n_queries=2, task_n_near=1), 7)
    try:
        for step in [0, 1, 2, 5, 6, 7]:
            a, b = plain.train_batch(step), pre.train_batch(step)
            assert all(torch.equal(x, y) for x, y in zip(a, b)), step
        assert pre.pending is None                         # step 7 is the last: no step 8 built
        assert all(torch.equal(x, y) for x, y in zip(plain.val_batch(1), pre.val_batch(1)))
        assert pre.is_task
    finally:
        pre.close()
