import pytest

from dsv4_lab import ConfigError, ModelConfig, TrainConfig, parse_overrides
from dsv4_lab.config import MODEL_PRESETS, flash_layer_types, pro_layer_types


def test_presets_build_and_validate():
    for name in MODEL_PRESETS:
        cfg = ModelConfig.from_preset(name)
        assert cfg.n_layers == len(cfg.layer_types) > 0


def test_flash_and_pro_shapes_follow_spec_section_4():
    f, p = ModelConfig.from_preset("flash"), ModelConfig.from_preset("pro")
    assert (f.n_layers, f.d_model, f.n_heads, f.head_dim, f.q_lora_rank, f.o_groups) == (43, 4096, 64, 512, 1024, 8)
    assert (p.n_layers, p.d_model, p.n_heads, p.head_dim, p.q_lora_rank, p.o_groups) == (61, 7168, 128, 512, 1536, 16)
    assert f.layer_types.count("csa") == 21 and f.layer_types.count("hca") == 20 and f.layer_types.count("swa") == 2
    assert p.layer_types.count("csa") == 30 and p.layer_types.count("hca") == 31
    assert f.layer_types == flash_layer_types(43) and p.layer_types == pro_layer_types(61)


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match="max_stepz"):
        parse_overrides(["max_stepz=40"])
    with pytest.raises(ConfigError, match="d_modle"):
        ModelConfig.from_preset("tiny", d_modle=3)


@pytest.mark.parametrize("kv, field", [
    ({"d_model": "abc"}, "d_model"),                    # wrong type
    ({"index_topk": 10_000, "layer_types": "csa*2"}, "index_topk"),   # more than possible entries
    ({"rope_head_dim": 64, "head_dim": 32}, "rope_head_dim"),         # head_dim smaller than RoPE dims
    ({"csa_ratio": 0}, "csa_ratio"),                    # ratio not a positive integer
    ({"hca_ratio": "2.5"}, "hca_ratio"),
    ({"layer_types": "dense,moe"}, "layer_types"),
    ({"residual": "resnet"}, "residual"),
    ({"o_groups": 3}, "o_groups"),
    ({"n_activated_experts": 9}, "n_activated_experts"),
])
def test_bad_values_name_field_value_and_allowed(kv, field):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_preset("tiny", **kv)
    msg = str(e.value)
    assert field in msg and "allowed" in msg


def test_train_config_validation():
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig(schedule="linear")
    for q in (0, 7):                                   # 2 needles x 3 types: 1..6 queries
        with pytest.raises(ConfigError, match=f"task_mrcr_queries' = {q}"):
            TrainConfig(data="mrcr", task_n_needles=2, task_mrcr_queries=q)
    with pytest.raises(ConfigError, match="lr"):
        parse_overrides(["lr=-1"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["max_steps"])


def test_overrides_share_one_namespace_and_coerce_types():
    mc, tc = parse_overrides(["preset=tiny", "max_steps=40", "lr=3e-3", "d_model=48", "attn_sink=false",
                              "layer_types=dense,swa,dense"])
    assert tc.max_steps == 40 and tc.lr == 3e-3
    assert mc.d_model == 48 and mc.attn_sink is False and mc.layer_types == ["dense", "swa", "dense"]


def test_layer_type_strings():
    assert ModelConfig.from_preset("tiny", layer_types="swa*3").layer_types == ["swa"] * 3
    assert ModelConfig.from_preset("tiny", layer_types="flash:4").layer_types == ["swa", "swa", "csa", "hca"]
    assert ModelConfig.from_preset("tiny-dense", n_layers=5).n_layers == 5


def test_warmup_auto():
    assert TrainConfig(max_steps=50).warmup_steps == 5
    with pytest.raises(ConfigError, match="warmup_steps"):
        TrainConfig(max_steps=10, warmup_steps=11)


def test_n_layers_resizes_or_conflicts():
    assert ModelConfig.from_preset("tiny-dense", n_layers=6).layer_types == ["dense"] * 6
    assert ModelConfig.from_preset("flash", n_layers=6).layer_types == ["swa", "swa", "csa", "hca", "csa", "hca"]
    with pytest.raises(ConfigError, match="n_layers"):
        ModelConfig.from_preset("tiny", n_layers=5)            # a mixed schedule cannot be resized implicitly
    with pytest.raises(ConfigError, match="n_layers"):
        ModelConfig.from_preset("tiny", layer_types="csa,hca", n_layers=3)
    assert ModelConfig.from_preset("tiny", layer_types="csa,hca", n_layers=2).n_layers == 2
