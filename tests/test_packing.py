"""Padding-free batches: the packed row gives the padded batch's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from prism.core.config import ModelSettings
from prism.data.collate import SFTCollator
from prism.data.formats import load_examples
from prism.data.packing import pack
from prism.tasks.grids.generator import SynthConfig, generate
from prism.losses.sft import IGNORE_INDEX, head_token_nll, shifted_token_nll
from prism.models.loader import load_model
from prism.models.logprobs import final_hidden_states, output_head


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth-pack")
    generate(SynthConfig(out=str(out), n=12, n_curated=6, n_align=2, n_rl=2, n_test=2, seed=3, grids=(3, 4)))
    rows = load_examples(str(out / "public.jsonl"), limit=4)  # 3x3 and 4x4 grids: different lengths
    assert len({len(r.response) for r in rows}) > 1
    return rows


def _loss_and_grads(model, batch, logits_chunk=0):
    model.zero_grad(set_to_none=True)
    labels = batch.pop("labels")
    if logits_chunk:  # prism-sft's default: hidden states, then the head on labelled positions only
        nll, n = head_token_nll(final_hidden_states(model, batch), output_head(model), labels, logits_chunk)
    else:
        nll, n = shifted_token_nll(model(**batch).logits, labels)
    (nll / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return (nll / n).item(), int(n), grads


@pytest.mark.parametrize("side", ["right", "left"])
def test_packed_batch_gives_the_padded_loss_and_gradients(tiny_model_dir, tiny_processor, examples, side):
    torch.manual_seed(0)
    model = load_model(ModelSettings(path=str(tiny_model_dir), freeze_vision=False, freeze_merger=False),
                       trainable=True)
    padded = SFTCollator(tiny_processor, 1024)(examples)
    if side == "left":  # the same rows, left-padded
        real = padded["attention_mask"].bool()
        for k in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
            pad = {"labels": IGNORE_INDEX, "input_ids": tiny_processor.tokenizer.pad_token_id}.get(k, 0)
            padded[k] = torch.stack([torch.cat([torch.full(((~m).sum(),), pad, dtype=r.dtype), r[m]])
                                     for r, m in zip(padded[k], real)])
    assert (padded["attention_mask"] == 0).any()  # there is padding to remove
    packed = pack(model, dict(padded))
    n_real = int(padded["attention_mask"].sum())
    assert packed["input_ids"].shape == (1, n_real) and packed["position_ids"].shape == (4, 1, n_real)
    assert "attention_mask" not in packed
    # text positions restart at 0 for each sequence
    starts = (packed["position_ids"][0, 0] == 0).nonzero().squeeze(-1).tolist()
    assert len(starts) == len(examples) and starts[0] == 0

    loss_a, n_a, grads_a = _loss_and_grads(model, dict(padded))
    loss_b, n_b, grads_b = _loss_and_grads(model, dict(packed))
    assert n_a == n_b
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    assert grads_a.keys() == grads_b.keys() and any("visual" in k for k in grads_a)
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], atol=1e-5, rtol=1e-4, msg=k)
    # prism-sft's chunked head (8-token slices here) gives the same loss and gradients, padded or packed
    for batch in (padded, packed):
        loss_c, n_c, grads_c = _loss_and_grads(model, dict(batch), logits_chunk=8)
        assert n_c == n_a and loss_c == pytest.approx(loss_a, abs=1e-5)
        assert grads_c.keys() == grads_a.keys()
        for k in grads_a:
            torch.testing.assert_close(grads_c[k], grads_a[k], atol=1e-5, rtol=1e-4, msg=k)


def test_packing_keeps_sequences_apart(tiny_model_dir, tiny_processor, examples):
    # The second sequence's logits must not depend on the first one: change the first, compare.
    model = load_model(ModelSettings(path=str(tiny_model_dir)), trainable=False)
    collate = SFTCollator(tiny_processor, 1024)
    a = pack(model, collate(examples[:2]))
    b = pack(model, collate([examples[2], examples[1]]))
    la, lb = model(**{k: v for k, v in a.items() if k != "labels"}).logits, \
        model(**{k: v for k, v in b.items() if k != "labels"}).logits
    n2 = int(collate(examples[1:2])["attention_mask"].sum())
    torch.testing.assert_close(la[0, -n2:], lb[0, -n2:], atol=1e-5, rtol=1e-4)
