"""`prism-tiny --like` on the configs of the families whose published files are not here (transformers' own
defaults of each config class stand in: the published sizes, layer patterns, expert counts and token ids), and
its faults."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from prism.cli import run_main
from prism.models.families import FAMILIES
from prism.models.tiny import like_sizes, main, shrink_config

pytestmark = pytest.mark.families


def published_like(model_type: str):
    fam = FAMILIES[model_type]
    return getattr(transformers, fam.model_class.replace("ForConditionalGeneration", "Config"))()


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_shrink_keeps_ids_rotary_layer_types_and_experts_and_the_model_runs(model_type):
    big = published_like(model_type)
    tiny = shrink_config(big)
    bt, tt = big.get_text_config(), tiny.get_text_config()
    assert tt.hidden_size <= 256 and tt.num_attention_heads == 2 and tt.num_hidden_layers <= 4
    for key in ("vocab_size", "rope_parameters", "num_experts", "num_experts_per_tok", "linear_conv_kernel_dim",
                "linear_key_head_dim", "linear_value_head_dim"):
        assert getattr(tt, key, None) == getattr(bt, key, None), key
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert getattr(tiny, key) == getattr(big, key), key
    if getattr(bt, "layer_types", None):
        assert tt.layer_types == bt.layer_types[:tt.num_hidden_layers] and set(tt.layer_types) == set(bt.layer_types)
    if FAMILIES[model_type].recurrent:  # three Gated-DeltaNet layers, then attention: all four kept
        assert tt.layer_types == ["linear_attention"] * 3 + ["full_attention"]
        ratio = bt.linear_num_value_heads // bt.linear_num_key_heads
        assert tt.linear_num_value_heads // tt.linear_num_key_heads == ratio
    bv, tv = big.vision_config, tiny.vision_config
    assert tv.depth == bv.depth
    deepstack = [list(getattr(c, "deepstack_visual_indexes", None) or []) for c in (tv, bv)]
    assert deepstack[0] == deepstack[1]
    torch.manual_seed(0)
    model = getattr(transformers, FAMILIES[model_type].model_class)(tiny).eval()
    assert sum(p.numel() for p in model.parameters()) < 200e6  # the vocabulary dominates: real, 152k-248k
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 12, tt.vocab_size) and torch.isfinite(logits).all()


def test_the_sizes_follow_the_head_width_of_each_family():
    assert like_sizes(published_like("qwen2_5_vl"))["hidden"] == 2 * 128  # hidden / heads: no head_dim key
    assert like_sizes(published_like("qwen3_vl"))["hidden"] == 128  # head_dim of its own
    assert like_sizes(published_like("qwen3_5"))["layers"] == 4
    assert like_sizes(published_like("qwen3_vl"))["layers"] == 2


def test_faults_are_one_line(tmp_path, capsys):
    def run(*argv):
        with pytest.raises(SystemExit) as e:
            run_main(lambda: main(list(argv)))
        return e.value.code, capsys.readouterr().err.strip()

    code, err = run("--like", str(tmp_path), "--out", str(tmp_path / "out"))
    assert code == 2 and "no config.json" in err and len(err.splitlines()) == 1
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    code, err = run("--like", str(tmp_path), "--out", str(tmp_path / "out"))
    assert code == 2 and "'llava'" in err and "qwen3_5" in err and len(err.splitlines()) == 1
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    code, err = run("--like", str(tmp_path), "--out", str(tmp_path / "out"))  # no tokenizer / processor files
    assert code == 2 and "tokenizer" in err and len(err.splitlines()) == 1


def test_prism_tiny_builds_every_family(tmp_path, capsys):
    for family in FAMILIES:
        main(["--family", family, "--out", str(tmp_path / family)])
        config = json.loads((tmp_path / family / "config.json").read_text())
        assert config["model_type"] == family
    out = capsys.readouterr().out
    assert "tiny Qwen3.5-MoE written to" in out and "tiny Qwen2-VL written to" in out


def test_a_thinking_checkpoint_is_copied_as_it_is_and_refused_only_when_used(tmp_path):
    """--like keeps SRC's template byte for byte, whatever it is; loading the tiny model with it is what refuses."""
    from test_families import THINKING_TEMPLATE

    from prism.core.errors import ConfigError
    from prism.models.processor import load_processor
    from prism.models.tiny import build_like, build_tiny

    src = build_tiny(tmp_path / "src")
    (src / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    out = build_like(src, tmp_path / "tiny")
    assert (out / "chat_template.jinja").read_text() == THINKING_TEMPLATE
    with pytest.raises(ConfigError, match="model.chat_template"):
        load_processor(out)
    assert load_processor(out, chat_template="chatml").chat_template != THINKING_TEMPLATE
