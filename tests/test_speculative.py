import pytest
import torch

from dsv4_lab import DSV4LM, ModelConfig, generate
from dsv4_lab.inference.speculative import speculative_generate


def _model(layer_types):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", layer_types=layer_types, index_n_heads=16, n_hash_layers=1)
    return DSV4LM(cfg).eval()


@pytest.mark.parametrize("layer_types, drafter", [(["swa", "csa", "hca", "csa"], "mtp"),
                                                  (["swa", "csa", "hca", "csa"], "alternate"),
                                                  (["dense", "swa"], "oracle"), (["dense", "swa"], "wrong")])
def test_speculative_equals_greedy_and_counts_acceptance(layer_types, drafter):
    """Whatever the drafts, the output is plain greedy decoding; accepted drafts save main-model calls and
    rejected ones roll the state cache back (the alternate drafter exercises both paths in one run)."""
    model = _model(layer_types)
    prompt = torch.randint(0, 256, (2, 19))
    n_new, P = 14, prompt.shape[1]
    ref = generate(model, prompt, n_new)

    def fake(m, hist_h, hist_tok, n_emitted):
        truth = ref[:, P + n_emitted]                 # the token after t_{p+1}, which is new[n_emitted - 1]
        good = drafter == "oracle" or (drafter == "alternate" and n_emitted % 2 == 0)
        return truth if good else (truth + 1) % 256

    ids, stats = speculative_generate(model, prompt, n_new, drafter=None if drafter == "mtp" else fake)
    assert torch.equal(ids, ref)
    assert stats["drafted"] >= 1 and 0 <= stats["accepted"] <= stats["drafted"]
    if drafter == "oracle":
        assert stats["acceptance_rate"] == 1.0 and stats["main_forward_calls"] <= n_new // 2 + 2
    elif drafter == "wrong":
        assert stats["acceptance_rate"] == 0.0 and stats["main_forward_calls"] == 1 + 2 * (n_new - 1)
    elif drafter == "alternate":
        assert 0.0 < stats["acceptance_rate"] < 1.0


def test_needs_mtp():
    cfg = ModelConfig.from_preset("tiny", mtp_depth=0)
    with pytest.raises(ValueError, match="mtp_depth"):
        speculative_generate(DSV4LM(cfg), torch.zeros(1, 4, dtype=torch.long), 3)
