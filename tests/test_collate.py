"""Collation: labels on exactly the assistant tokens, padding, prompts for generation, the SFT loss."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from PIL import Image

from prism.data.collate import SFTCollator, encode_prompts, render
from prism.core.errors import DataError
from prism.core.example import Example
from prism.losses.sft import IGNORE_INDEX, head_token_nll, shifted_token_nll

ANSWER = "<caption>row 1: red blue</caption><think>One red.</think><answer>1</answer>"


def red(size=(48, 48)) -> Image.Image:
    return Image.new("RGB", size, (255, 0, 0))


def single(question="How many red cells?", answer=ANSWER, image=None) -> Example:
    return Example(
        messages=[{"role": "user", "content": f"<image>{question}"}, {"role": "assistant", "content": answer}],
        images=[image or red()],
    )


def template_mask(processor, chat) -> tuple[list[int], list[int]]:
    """input_ids and assistant mask as the chat template's own {% generation %} blocks mark them."""
    out = processor.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"][0]), list(out["assistant_masks"][0])


def runs(mask: list[bool]) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of True."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


# ---------------------------------------------------------------------------------- labels


def test_single_turn_labels_exactly_the_assistant_tokens(tiny_processor):
    image = red()
    batch = SFTCollator(tiny_processor)([single(image=image)])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    labelled = labels != IGNORE_INDEX

    assert tiny_processor.tokenizer.decode(ids[labelled]) == ANSWER + "<|im_end|>"
    assert torch.equal(labels[labelled], ids[labelled])
    assert set(labels[~labelled].tolist()) == {IGNORE_INDEX}

    chat = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "How many red cells?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]},
    ]
    ref_ids, ref_mask = template_mask(tiny_processor, chat)
    assert ids.tolist() == ref_ids
    assert labelled.int().tolist() == ref_mask


def test_collated_batch_has_what_the_model_forward_takes(tiny_processor):
    batch = SFTCollator(tiny_processor)([single()])
    assert {"input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw"} <= set(batch)
    assert batch["image_grid_thw"].tolist() == [[1, 6, 6]]
    assert batch["labels"].shape == batch["input_ids"].shape == batch["attention_mask"].shape


def test_two_turns_two_images_label_both_answers_and_nothing_else(tiny_processor):
    first, second = red((48, 48)), Image.new("RGB", (64, 32), (0, 0, 255))
    ex = Example(
        messages=[
            {"role": "user", "content": "<image>Which colour?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "And in <image> this one?"},
            {"role": "assistant", "content": "<answer>blue</answer>"},
        ],
        images=[first, second],
    )
    batch = SFTCollator(tiny_processor)([ex])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    labelled = labels != IGNORE_INDEX

    # 48x48 -> 6x6 patches of 8 px; 64 wide x 32 high -> 4 rows x 8 columns; 9 + 8 tokens after 2x2 merging.
    assert batch["image_grid_thw"].tolist() == [[1, 6, 6], [1, 4, 8]]
    assert int((ids == tiny_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == 9 + 8

    decoded = [tiny_processor.tokenizer.decode(ids[a:b]) for a, b in runs(labelled.tolist())]
    assert decoded == ["red<|im_end|>", "<answer>blue</answer><|im_end|>"]

    chat = [
        {"role": "user", "content": [{"type": "image", "image": first}, {"type": "text", "text": "Which colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "And in "}, {"type": "image", "image": second},
                                     {"type": "text", "text": " this one?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<answer>blue</answer>"}]},
    ]
    ref_ids, ref_mask = template_mask(tiny_processor, chat)
    assert ids.tolist() == ref_ids
    assert labelled.int().tolist() == ref_mask


def test_batch_is_right_padded_and_padding_is_never_labelled(tiny_processor):
    short = single(question="How many?", answer="two")
    long = single(question="How many red cells are there in the grid image?", answer=ANSWER)
    collate = SFTCollator(tiny_processor)
    batch = collate([short, long])
    alone = collate([short])
    n = alone["input_ids"].shape[1]
    assert batch["input_ids"].shape[1] > n

    # The short row is itself, then padding on the right.
    assert torch.equal(batch["input_ids"][0, :n], alone["input_ids"][0])
    assert torch.equal(batch["labels"][0, :n], alone["labels"][0])
    assert batch["attention_mask"][0, :n].all()
    pad = tiny_processor.tokenizer.pad_token_id
    assert (batch["input_ids"][0, n:] == pad).all()
    assert (batch["attention_mask"][0, n:] == 0).all()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    # The long row fills the batch and its last label is its <|im_end|>, before the trailing newline.
    assert batch["attention_mask"][1].all()
    labelled = (batch["labels"][1] != IGNORE_INDEX).nonzero().flatten()
    assert tiny_processor.tokenizer.decode(batch["input_ids"][1, labelled]) == ANSWER + "<|im_end|>"


def test_example_without_assistant_turn_is_a_data_error(tiny_processor):
    ex = Example(messages=[{"role": "user", "content": "<image>hi"}], images=[red()], source="d.jsonl:3")
    with pytest.raises(DataError, match="d.jsonl:3"):
        SFTCollator(tiny_processor)([ex])


def test_batch_longer_than_max_length_is_a_data_error(tiny_processor):
    with pytest.raises(DataError, match="max_length=10"):
        SFTCollator(tiny_processor, max_length=10)([single()])


@pytest.mark.parametrize("n_images", [0, 1])
def test_more_placeholders_than_images_is_a_data_error(tiny_processor, n_images):
    ex = Example(
        messages=[{"role": "user", "content": "<image><image>Compare."}, {"role": "assistant", "content": "same"}],
        images=[red()] * n_images, source="d.jsonl:7",
    )
    with pytest.raises(DataError, match=f"d.jsonl:7: 2 <image> placeholder\\(s\\) but {n_images} image"):
        SFTCollator(tiny_processor)([ex])
    with pytest.raises(DataError, match="d.jsonl:7"):
        encode_prompts(tiny_processor, [ex])


# ---------------------------------------------------------------------------------- prompts


def test_encode_prompts_left_pads_and_ends_with_the_generation_prompt(tiny_processor):
    tok = tiny_processor.tokenizer
    short = single(question="How many?", answer="two")
    long = single(question="How many red cells are there in the grid image?", answer="three")
    batch = encode_prompts(tiny_processor, [short, long])
    ids, mask = batch["input_ids"], batch["attention_mask"]

    generation_prompt = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    k = len(generation_prompt)
    assert ids[0, -k:].tolist() == generation_prompt and ids[1, -k:].tolist() == generation_prompt

    n_pad = int((mask[0] == 0).sum())
    assert n_pad > 0 and mask[1].all()
    assert (mask[0, :n_pad] == 0).all() and mask[0, n_pad:].all()  # left padding, then the prompt
    assert (ids[0, :n_pad] == tok.pad_token_id).all()

    # The prompt is the conversation without the answer, rendered by the template.
    text = tok.decode(ids[0, n_pad:])
    expected = render(tiny_processor, short.prompt_messages, add_generation_prompt=True)
    assert text == expected.replace("<|image_pad|>", "<|image_pad|>" * 9)
    assert "two" not in text
    assert tok.padding_side == "right"  # restored for the collator


# ---------------------------------------------------------------------------------- loss


def test_shifted_nll_of_uniform_logits_is_ln_v_per_counted_token():
    logits = torch.zeros(2, 4, 3)  # B=2, T=4, V=3: every prediction is 1/3
    labels = torch.tensor([[0, 1, IGNORE_INDEX, 2],
                           [IGNORE_INDEX, IGNORE_INDEX, 0, 1]])
    nll, n = shifted_token_nll(logits, labels)
    # Targets are labels[:, 1:]: [1, -100, 2] and [-100, 0, 1], so 2 + 2 counted tokens; the
    # first position (label 0 in row 0) is never a target.
    assert n.item() == 4 and n.dtype == torch.long
    assert nll.item() == pytest.approx(4 * math.log(3))


def test_shifted_nll_uses_the_previous_position_to_predict():
    # Position 0 predicts label 1 with probabilities (1, 2, 5) / 8; position 1 predicts label 2
    # with probabilities (1, 1, 2) / 4. Position 2's logits have no target.
    logits = torch.log(torch.tensor([[[1.0, 2.0, 5.0], [1.0, 1.0, 2.0], [9.0, 9.0, 9.0]]]))
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    nll, n = shifted_token_nll(logits, labels)
    # -ln(2/8) - ln(1/4) = ln 4 + ln 4
    assert n.item() == 2
    assert nll.item() == pytest.approx(2 * math.log(4), rel=1e-6)


def test_shifted_nll_is_float32_for_bfloat16_logits():
    logits = torch.zeros(1, 3, 3, dtype=torch.bfloat16)
    nll, n = shifted_token_nll(logits, torch.tensor([[0, 1, 2]]))
    assert nll.dtype == torch.float32
    assert nll.item() == pytest.approx(2 * math.log(3), rel=1e-6)


def test_head_token_nll_equals_the_full_logits_loss_with_its_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=False)
    hidden = torch.randn(2, 5, 6, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 7, 1],
                           [IGNORE_INDEX, 4, 4, IGNORE_INDEX, IGNORE_INDEX]])
    ref, n_ref = shifted_token_nll(head(hidden), labels)
    ref.backward()
    ref_grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    nll, n = head_token_nll(hidden, head, labels, logits_chunk=2)  # 5 labelled positions: slices of 2, 2, 1
    nll.backward()
    assert n.item() == n_ref.item() == 5
    assert nll.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(hidden.grad, ref_grads[0], atol=1e-6) and torch.allclose(head.weight.grad, ref_grads[1], atol=1e-6)
    assert hidden.grad[:, -1].abs().sum() == 0  # the last position predicts nothing
    assert hidden.grad[1, 2:].abs().sum() == 0  # nor do positions whose next label is ignored


def test_all_ignored_labels_give_zero_loss_and_count():
    nll, n = head_token_nll(torch.randn(1, 3, 4), torch.nn.Linear(4, 5), torch.full((1, 3), IGNORE_INDEX))
    assert nll.item() == 0.0 and n.item() == 0

    nll, n = shifted_token_nll(torch.randn(1, 3, 5), torch.full((1, 3), IGNORE_INDEX))
    assert nll.item() == 0.0 and n.item() == 0


def test_token_lengths_read_image_sizes_from_headers_and_equal_the_collated_lengths(tiny_processor, tmp_path):
    """The start-up lengths (batched tokenisation, image sizes from file headers, once per path) are the
    lengths the collator produces, for image paths, image bytes and text-only examples."""
    import io

    from prism.data.collate import token_lengths

    paths = []
    for i, size in enumerate([(32, 32), (128, 128), (40, 72)]):
        paths.append(str(tmp_path / f"im{i}.png"))
        Image.new("RGB", size, (255, 0, 0)).save(paths[-1])
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), (0, 0, 255)).save(buf, format="PNG")
    examples = [single(image=p) for p in paths] + [single(image=paths[0]), single(image=buf.getvalue())]
    examples.append(Example(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ANSWER}]))
    lengths = token_lengths(tiny_processor, examples, batch_size=2)
    collate = SFTCollator(tiny_processor, max_length=4096)
    assert lengths == [int(collate([ex])["attention_mask"].sum()) for ex in examples]
    assert lengths[0] == lengths[3] and lengths[1] > lengths[0]  # a bigger image, more image tokens


def test_an_image_rewritten_after_its_size_was_read_is_read_again(tiny_processor, tmp_path):
    import os
    import time

    from prism.data.images import image_size

    path = tmp_path / "im.png"
    Image.new("RGB", (48, 48)).save(path)
    assert image_size(str(path)) == (48, 48)
    time.sleep(0.01)
    Image.new("RGB", (64, 32)).save(path)
    os.utime(path, ns=(time.time_ns(), time.time_ns()))
    assert image_size(str(path)) == (64, 32)  # cached per (path, size, mtime), not per path
    path.write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read image"):
        image_size(str(path), "data.jsonl:3")


def test_prompt_batches_with_decoded_images_equal_the_drawn_ones(tmp_path):
    """`prompt_batch` draws `batch_indices`' prompts; decoding turns each image into the RGB picture the
    sampler would have decoded, and a loader process gives the same batches in order."""
    from PIL import Image

    from prism.core.example import Example, load_image
    from prism.data.loader import prompt_batch, step_loader
    from prism.data.order import batch_indices

    Image.new("P", (6, 4), 3).save(tmp_path / "p.png")  # palette: decoding converts it to RGB
    prompts = [Example(messages=[{"role": "user", "content": f"<image>q{i}"}], images=[str(tmp_path / "p.png")],
                       answer=str(i)) for i in range(7)]
    plain = [prompt_batch(prompts, 3, 2, 1, 5, False, draw) for draw in range(3)]
    for draw, batch in enumerate(plain):
        assert [ex.answer for ex in batch] == [prompts[i].answer for i in batch_indices(7, draw, 3, 2, 1, 5)]
        assert batch[0].images == [str(tmp_path / "p.png")]
    ahead = list(step_loader(functools.partial(prompt_batch, prompts, 3, 2, 1, 5, True), 0, 2, workers=1))
    for got, want in zip(ahead, plain):
        assert [ex.answer for ex in got] == [ex.answer for ex in want]
        assert [ex.messages for ex in got] == [ex.messages for ex in want]
        image = got[0].images[0]
        assert image.mode == "RGB" and image.tobytes() == load_image(want[0].images[0]).tobytes()
