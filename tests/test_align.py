"""ALIGN: the discriminator loss and alignment advantages by hand, the MoE discriminator's contract
(padding, text_only, expert isolation, save/load, upcycling), `prism-align` end to end, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from prism.align import MoEDiscriminator, alignment_advantages, discriminator_loss
from prism.align import game
from prism.align import train as align
from prism.align.upcycle import upcycle
from prism.align.config import AlignConfig
from prism.core.config import ConfigError, load_config
from prism.data.collate import SFTCollator
from prism.core.errors import DataError
from prism.data.formats import load_examples
from prism.tasks.grids import TASK
from prism.tasks.grids.generator import SynthConfig, generate
from prism.core.response import is_format_valid


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth-align")
    generate(SynthConfig(out=str(out), n=16, n_curated=4, n_align=12, n_rl=4, n_test=4, seed=3))
    return out


@pytest.fixture(scope="module")
def examples(synth_dir):
    return load_examples(synth_dir / "align.jsonl", limit=4)


@pytest.fixture(scope="module")
def disc(tiny_model_dir):
    return MoEDiscriminator.from_pretrained(tiny_model_dir)


def sp(x: float) -> float:  # −log σ(x)
    return math.log1p(math.exp(-x))


# ------------------------------------------------------------------------------------ pure functions


def test_discriminator_loss_by_hand():
    teacher = {"perception": torch.tensor([2.0, 0.0, 1.0]), "reasoning": torch.tensor([1.0, 1.0, 0.0])}
    policy = {"perception": torch.tensor([0.0, 0.0, 3.0]), "reasoning": torch.tensor([1.0, -1.0, 2.0])}
    valid = torch.tensor([True, True, False])  # the third rollout is not compared
    loss, m = discriminator_loss(teacher, policy, valid, reg=1e-3)
    # perception gaps 2, 0; reasoning gaps 0, 2; squares per valid row: (4+0+1+1)/4 = 1.5, (0+0+1+1)/4 = 0.5
    expected = (sp(2) + sp(0)) / 2 + (sp(0) + sp(2)) / 2 + 1e-3 * (1.5 + 0.5) / 2
    assert loss.item() == pytest.approx(expected)
    assert m["perception/acc"] == 0.5 and m["reasoning/acc"] == 0.5  # ties do not count as wins
    assert m["perception/gap"] == pytest.approx(1.0) and m["reasoning/gap"] == pytest.approx(1.0)
    assert m["perception/teacher"] == pytest.approx(1.0) and m["reasoning/policy"] == pytest.approx(0.0)
    assert m["no_valid"] == 0
    # rollout 2 copied the reference's caption: left out of the distinguishable-pairs accuracy only
    distinct = {"perception": torch.tensor([True, False, True]), "reasoning": torch.tensor([True, True, True])}
    loss2, m = discriminator_loss(teacher, policy, valid, reg=1e-3, distinct=distinct)
    assert loss2.item() == pytest.approx(expected)  # the loss does not change
    assert m["perception/acc_distinct"] == 1.0 and m["perception/distinct"] == 0.5
    assert m["reasoning/acc_distinct"] == 0.5


def test_discriminator_loss_without_valid_rollouts_is_zero_not_nan():
    s = {"perception": torch.tensor([1.0, 2.0], requires_grad=True), "reasoning": torch.tensor([0.0, 1.0])}
    loss, m = discriminator_loss(s, s, torch.tensor([False, False]))
    assert loss.item() == 0 and m["no_valid"] == 1
    loss.backward()  # still a graph: every process can run the same backward
    assert torch.all(s["perception"].grad == 0)


def _gn(x: list[float]) -> list[float]:
    mean = sum(x) / len(x)
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / (len(x) - 1))
    return [(v - mean) / (std + 1e-6) for v in x]


def test_alignment_advantages_by_hand():
    # group 1: rollout 3 invalid -> s_v = min(1, 2) − 1 = 0, s_r = min(0, 3) − 1 = −1; group 2: none valid -> all −1
    s_v = torch.tensor([1.0, 2.0, 5.0, 4.0, 7.0, 1.0])
    s_r = torch.tensor([0.0, 3.0, 9.0, 2.0, 2.0, 8.0])
    valid = torch.tensor([True, True, False, False, False, False])
    gv, gr = _gn([1, 2, 0]), _gn([0, 3, -1])
    adv = alignment_advantages(s_v, s_r, valid, group_size=3, alpha=0.5, format_penalty=1.5)
    expected = [0.5 * gv[0] + 0.5 * gr[0], 0.5 * gv[1] + 0.5 * gr[1], 0.5 * gv[2] + 0.5 * gr[2] - 1.5,
                -1.5, -1.5, -1.5]  # an all-invalid group: equal scores normalise to 0, only the penalty is left
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    assert alignment_advantages(s_v, s_r, valid, 3, alpha=1.0).tolist()[:3] == pytest.approx(
        [gv[0], gv[1], gv[2] - 1.5], abs=1e-6)  # perception only
    assert alignment_advantages(s_v, s_r, valid, 3, alpha=0.0).tolist()[:3] == pytest.approx(
        [gr[0], gr[1], gr[2] - 1.5], abs=1e-6)  # reasoning only
    assert alignment_advantages(s_v, s_r, torch.ones(6, dtype=torch.bool), 1).tolist() == [0.0] * 6  # groups of one
    with pytest.raises(ValueError, match="alpha"):
        alignment_advantages(s_v, s_r, valid, 3, alpha=1.5)


# ------------------------------------------------------------------------------------ the discriminator


def test_scores_do_not_depend_on_padding_side(disc, examples):
    responses = [ex.response for ex in examples]
    responses[1] = responses[1].replace("row 1", "row 1: and more words")  # unequal lengths -> real padding
    right, left = disc.score(examples, responses, padding_side="right"), disc.score(examples, responses, padding_side="left")
    for comp in ("perception", "reasoning"):
        torch.testing.assert_close(right[comp], left[comp], atol=1e-5, rtol=0)
    assert not torch.equal(right["perception"], right["reasoning"])  # two experts, two scores


def test_text_only_never_passes_pixel_values(tiny_model_dir, examples, monkeypatch):
    d = MoEDiscriminator.from_pretrained(tiny_model_dir, text_only=True, score_clip=0.5)
    seen = []
    body = d._base().model
    original = body.forward
    monkeypatch.setattr(body, "forward", lambda **kw: seen.append(set(kw)) or original(**kw))
    scores = d.score(examples, [ex.response for ex in examples])
    assert seen and all("pixel_values" not in keys and "image_grid_thw" not in keys for keys in seen)
    assert all(scores[c].abs().max() <= 0.5 for c in scores)  # clipped to ±score_clip
    inputs = d.encode(examples, ["x"] * len(examples), "perception")
    image_pad = d.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert not (inputs["input_ids"] == image_pad).any()


@pytest.mark.parametrize("trained, frozen", [("perception", "reasoning"), ("reasoning", "perception")])
def test_each_expert_loss_touches_only_its_own_adapter_and_head(tiny_model_dir, examples, trained, frozen):
    d = MoEDiscriminator.from_pretrained(tiny_model_dir)
    d.train()
    d(d.encode(examples, ["row 1: red"] * len(examples), trained), trained).scores.sum().backward()
    own, other = d.expert_parameters(trained), d.expert_parameters(frozen)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in own.values())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in other.values()), [
        n for n, p in other.items() if p.grad is not None and p.grad.abs().sum() > 0][:3]
    frozen_backbone = [p for n, p in d.backbone.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in frozen_backbone)


def test_save_and_reload_give_the_same_scores(disc, examples, tmp_path):
    responses = [ex.response for ex in examples]
    with torch.no_grad():
        for p in disc.heads.parameters():
            p.add_(0.1)  # not the initial state
    before = disc.score(examples, responses)
    disc.save_pretrained(tmp_path / "d")
    again = MoEDiscriminator.from_pretrained(tmp_path / "d").score(examples, responses)
    for comp in before:
        torch.testing.assert_close(before[comp], again[comp])
    with pytest.raises(ConfigError, match="saved with dense=False, cannot load it as dense=True"):
        MoEDiscriminator.from_pretrained(tmp_path / "d", dense=True)
    # a discriminator.json of an earlier version (load options and `extra` in it) still loads, to the same scores
    config = json.loads((tmp_path / "d" / "discriminator.json").read_text())
    (tmp_path / "d" / "discriminator.json").write_text(json.dumps({**config, "dtype": "auto", "extra": {}}))
    old = MoEDiscriminator.from_pretrained(tmp_path / "d").score(examples, responses)
    torch.testing.assert_close(before["perception"], old["perception"])
    # anything else unknown is an error naming the key, not silently dropped
    (tmp_path / "d" / "discriminator.json").write_text(json.dumps({**config, "lora_rank": 4}))
    with pytest.raises(ConfigError, match=r"discriminator\.json: unknown config key 'lora_rank'$"):
        MoEDiscriminator.from_pretrained(tmp_path / "d")


def test_reasoning_span_think_answer_scores_the_answer_too(tiny_model_dir, examples):
    from prism.core.response import parse_response

    same_think = ["<caption>c</caption><think>count the cells</think><answer>3</answer>",
                  "<caption>c</caption><think>count the cells</think><answer>4</answer>"]
    parsed = [parse_response(r) for r in same_think]
    think = MoEDiscriminator.from_pretrained(tiny_model_dir)
    both = MoEDiscriminator.from_pretrained(tiny_model_dir, reasoning_span="think_answer")
    assert think.segment(parsed[0], "reasoning") == "<think>count the cells</think>"
    assert both.segment(parsed[0], "reasoning") == "<think>count the cells</think><answer>3</answer>"
    assert both.segment(parsed[0], "perception") == "<caption>c</caption>"  # the perception expert is unchanged
    assert both.segment(parse_response("no tags"), "reasoning") == "<think></think><answer></answer>"
    with torch.no_grad():
        for d in (think, both):
            d.heads["reasoning"].bias.zero_()
            d.heads["reasoning"].weight.normal_(std=0.5)  # scores well inside the ±10 clip
    prompts = [examples[0], examples[0]]
    a = think.score(prompts, same_think)["reasoning"]
    b = both.score(prompts, same_think)["reasoning"]
    assert b.abs().max() < 10
    torch.testing.assert_close(a[0], a[1])  # the think sections are the same
    assert (b[0] - b[1]).abs() > 1e-3  # only think_answer sees that the answers differ


def test_dense_ablation_scores_both_components_with_one_scorer(tiny_model_dir, examples):
    d = MoEDiscriminator.from_pretrained(tiny_model_dir, dense=True)
    same = ["row 1: red"] * len(examples)
    a = d(d.encode(examples, same, "perception"), "perception").scores
    b = d(d.encode(examples, same, "perception"), "reasoning").scores
    torch.testing.assert_close(a, b)


def test_upcycling_preserves_the_dense_outputs_at_zero_noise(tiny_model_dir, tiny_processor, examples):
    dense = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    batch = SFTCollator(tiny_processor)(examples[:2])
    batch.pop("labels")
    moe = upcycle(dense, experts=4, top_k=2, noise=0.0)
    with torch.no_grad():
        torch.testing.assert_close(moe(**batch).logits, dense(**batch).logits, atol=1e-5, rtol=0)
        noisy = upcycle(dense, experts=4, top_k=2, noise=0.1)(**batch).logits
    assert (noisy - dense(**batch).logits).abs().max() > 1e-4
    assert moe.config.text_config.num_experts == 4 and moe.config.text_config.num_experts_per_tok == 2


def test_upcycled_discriminator_has_a_router_loss_and_text_only_works(tmp_path, tiny_model_dir, examples):
    from prism.align.upcycle import main as upcycle_main

    upcycle_main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "moe"), "--experts", "3", "--top-k", "1"])
    for text_only in (False, True):
        d = MoEDiscriminator.from_pretrained(tmp_path / "moe", experts="upcycled", text_only=text_only)
        out = d(d.encode(examples, ["row 1: red"] * len(examples), "reasoning"), "reasoning")
        assert out.scores.shape == (len(examples),) and out.aux_loss is not None and out.aux_loss > 0
    with pytest.raises(ConfigError, match="needs a MoE backbone"):
        MoEDiscriminator.from_pretrained(tiny_model_dir, experts="upcycled")


def test_a_processor_that_does_not_fit_the_backbone_is_refused(tiny_model_dir, tmp_path, tiny_processor):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    tok = tiny_processor.tokenizer.__class__.from_pretrained(tiny_model_dir)
    tok.add_tokens([f"<extra_{i}>" for i in range(200)])
    tok.save_pretrained(bad)
    with pytest.raises(ConfigError, match="tokenizer has .* tokens but the backbone embeds only"):
        MoEDiscriminator.from_pretrained(bad)


def test_corruption_changes_one_caption_cell_and_one_reasoning_step(examples):
    import random

    ref = examples[0].response
    bad = TASK.corrupt_response(ref, random.Random(0))
    assert is_format_valid(bad) and bad != ref
    from prism.core.response import parse_response

    a, b = parse_response(ref), parse_response(bad)
    assert a.answer == b.answer
    assert sum(x != y for x, y in zip(a.caption.split(), b.caption.split())) == 1
    assert sum(x != y for x, y in zip(a.think.split(), b.think.split())) == 1  # one number replaced
    assert len(a.think.split()) == len(b.think.split())


# ------------------------------------------------------------------------------------ prism-align


def _cfg(model_dir, data_dir, out_dir, **extra) -> AlignConfig:
    base = {
        "model.path": model_dir, "discriminator.path": model_dir, "data.train": f"{data_dir}/align.jsonl",
        "data.eval": f"{data_dir}/test.jsonl", "data.eval_limit": 2, "train.output_dir": out_dir,
        "train.prompts_per_step": 2, "train.max_steps": 2, "rollout.group_size": 3, "rollout.max_new_tokens": 10,
        "optim.lr": 1e-3, "discriminator.lr": 1e-2, "eval.max_new_tokens": 6, "logging.tensorboard": False,
        "warmup.steps": 0, "algo.micro_batch_size": 4, "data.task": "grids",
    }
    base.update(extra)
    return load_config(AlignConfig, None, [f"{k}={v}" for k, v in base.items()])


@pytest.mark.slow
def test_two_align_steps_move_the_policy_and_both_experts(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    # A random policy never writes a valid response; count every rollout as valid so that the
    # discriminator is updated on (reference, rollout) pairs in this smoke test.
    monkeypatch.setattr(align, "is_format_valid", lambda text: True)
    metrics = align.train(_cfg(tiny_model_dir, synth_dir, tmp_path))
    ckpt = tmp_path / "checkpoint-000002"
    from safetensors.torch import load_file

    before, after = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before if "language_model" in k)
    fresh = MoEDiscriminator.from_pretrained(tiny_model_dir)
    trained = MoEDiscriminator.from_pretrained(ckpt / "discriminator")
    for expert in ("perception", "reasoning"):
        a, b = fresh.expert_parameters(expert), trained.expert_parameters(expert)
        lora_b = [n for n in a if "lora_B" in n]
        assert lora_b and all(not torch.equal(a[n], b[n]) for n in lora_b), expert
    for key in ("disc/perception/acc", "disc/reasoning/acc", "disc/perception/gap", "rollout/format_rate",
                "rollout/caption_match", "rollout/accuracy", "score/perception", "actor/entropy", "eval/accuracy"):
        assert key in metrics, key
    assert (ckpt / "disc_optimizer.pt").is_file()


@pytest.mark.slow
def test_resume_continues_exactly_and_warmup_runs_once(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(align, "is_format_valid", lambda text: True)
    extra = {"train.max_steps": 3, "data.eval": "null", "warmup.steps": 2, "warmup.negatives": "corrupt",
             "warmup.pairs_per_step": 4, "warmup.eval_pairs": 2, "train.save_every": 1}
    align.train(_cfg(tiny_model_dir, synth_dir, tmp_path / "full", **extra))
    align.train(_cfg(tiny_model_dir, synth_dir, tmp_path / "part", **{**extra, "train.max_steps": 1}))
    # resumed with 2 loader processes decoding the prompts' images ahead: the same batches, in order
    align.train(_cfg(tiny_model_dir, synth_dir, tmp_path / "part", **{**extra, "data.num_workers": 2}))
    rows = {}
    for run in ("full", "part"):
        lines = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        rows[run] = {r["step"]: r for r in lines}
        assert sum(r["step"] == 0 for r in lines) == 1  # the warm-start ran once, not again on resume
        assert "warmup/perception_acc" in rows[run][0]
    for step in (2, 3):
        for key in ("score/perception", "disc/reasoning/gap", "actor/loss", "rollout/length"):
            assert rows["full"][step][key] == pytest.approx(rows["part"][step][key], abs=1e-5), (step, key)


@pytest.mark.slow
def test_warmup_alone_on_its_own_data(tiny_model_dir, synth_dir, tmp_path):
    extra = {"warmup.steps": 1, "warmup.negatives": "corrupt", "warmup.pairs_per_step": 2, "warmup.eval_pairs": 2,
             "warmup.data": f"{synth_dir}/curated.jsonl", "data.eval": "null"}
    metrics = align.train(_cfg(tiny_model_dir, synth_dir, tmp_path, **extra), warmup_only=True)
    n_curated = len((synth_dir / "curated.jsonl").read_text().splitlines())
    assert metrics["warmup/pairs"] + metrics["warmup/held_out_pairs"] == n_curated  # not the align split
    assert (tmp_path / "warmup" / "metrics.json").is_file()
    assert not list(tmp_path.glob("checkpoint-*"))  # warm-start only: the game does not start


@pytest.mark.slow
def test_discriminator_placement_options_change_nothing_on_one_device(tiny_model_dir, synth_dir, tmp_path, monkeypatch):
    # Here both placements are the CPU, so this checks the code path and the arithmetic, not the copies.
    monkeypatch.setattr(align, "is_format_valid", lambda text: True)
    extra = {"train.max_steps": 1, "data.eval": "null"}
    a = align.train(_cfg(tiny_model_dir, synth_dir, tmp_path / "a", **extra))
    b = align.train(_cfg(tiny_model_dir, synth_dir, tmp_path / "b", **{**extra, "discriminator.offload": True,
                                                                      "discriminator.device": "cpu"}))
    for key in ("disc/perception/acc", "disc/reasoning/gap", "score/perception", "actor/loss"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key

    class TwoProcesses:
        num_processes, device = 2, torch.device("cpu")

    cfg = _cfg(tiny_model_dir, synth_dir, tmp_path / "c", **{"discriminator.device": "cuda:1"})
    with pytest.raises(ConfigError, match="discriminator.device: 'cuda:1' names one device for all 2 processes"):
        game.Placement(cfg, TwoProcesses())
    offload = game.Placement(_cfg(tiny_model_dir, synth_dir, tmp_path / "c", **{"discriminator.offload": True}),
                              TwoProcesses())
    assert offload.home == torch.device("cpu")


def test_bad_alignment_data_and_config(tiny_model_dir, synth_dir, tmp_path):
    rows = [json.loads(x) for x in (synth_dir / "align.jsonl").read_text().splitlines()[:4]]
    for r in rows:
        r["images"] = [str(synth_dir / p) for p in r["images"]]
    no_ref = [dict(r) for r in rows]
    no_ref[1]["messages"] = no_ref[1]["messages"][:1]
    no_ref[3]["messages"] = no_ref[3]["messages"][:1]
    (tmp_path / "no_ref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in no_ref))
    cfg = _cfg(tiny_model_dir, synth_dir, tmp_path / "o", **{"data.train": tmp_path / "no_ref.jsonl"})
    with pytest.raises(DataError, match="2 of 4 alignment prompts have no teacher reference"):
        align.load_alignment_data(cfg)
    cfg = _cfg(tiny_model_dir, synth_dir, tmp_path / "o", **{"data.train": tmp_path / "no_ref.jsonl",
                                                             "align.skip_missing_references": True})
    assert len(align.load_alignment_data(cfg)) == 2
    bad_ref = [dict(r) for r in rows]
    bad_ref[2]["messages"] = [bad_ref[2]["messages"][0], {"role": "assistant", "content": "<answer>3</answer>"}]
    (tmp_path / "bad_ref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad_ref))
    cfg = _cfg(tiny_model_dir, synth_dir, tmp_path / "o", **{"data.train": tmp_path / "bad_ref.jsonl"})
    with pytest.raises(DataError, match="bad_ref.jsonl:3: teacher reference is not format-valid"):
        align.load_alignment_data(cfg)
    with pytest.raises(ConfigError, match="align.alpha"):
        _cfg(tiny_model_dir, synth_dir, tmp_path, **{"align.alpha": 1.2})
    with pytest.raises(ConfigError, match="no KL term"):
        align.train(_cfg(tiny_model_dir, synth_dir, tmp_path, **{"algo.kl_coef": 0.1}))


def test_discriminator_gradient_checkpointing_changes_no_score_and_no_gradient(tiny_model_dir, examples):
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA and head initialisation for both
        d = MoEDiscriminator.from_pretrained(tiny_model_dir, gradient_checkpointing=checkpointing)
        d.train()
        scores = d(d.encode(examples, ["row 1: red"] * len(examples), "reasoning"), "reasoning").scores
        scores.sum().backward()
        grads = {n: p.grad.clone() for n, p in d.expert_parameters("reasoning").items() if p.grad is not None}
        results.append((scores.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys() and len(results[0][1]) > 10
    for n in results[0][1]:
        torch.testing.assert_close(results[0][1][n], results[1][1][n], atol=1e-6, rtol=1e-5)


def test_reasoning_span_is_a_config_switch_saved_with_the_discriminator(tiny_model_dir, tmp_path):
    cfg = load_config(AlignConfig, None, ["discriminator.reasoning_span=think_answer"])
    assert cfg.discriminator.architecture().reasoning_span == "think_answer"
    assert load_config(AlignConfig).discriminator.reasoning_span == "think"  # default
    with pytest.raises(ConfigError, match="discriminator.reasoning_span"):
        load_config(AlignConfig, None, ["discriminator.reasoning_span=answer"])
    d = game.build_discriminator(cfg, tiny_model_dir)
    d.save_pretrained(tmp_path / "d")
    assert MoEDiscriminator.from_pretrained(tmp_path / "d").config.reasoning_span == "think_answer"
