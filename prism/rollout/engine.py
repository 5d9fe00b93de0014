"""The rollout engine: the only code in prism that samples from a model.

    rollouts = sample(model, processor, examples, SamplingParams(n=8, temperature=1.0, max_new_tokens=256))
    rollouts.response_ids, rollouts.response_mask, rollouts.log_probs   # [N, T], N = len(examples) * n
    rollouts.texts, rollouts.finish_reasons                              # N strings ("stop" | "length")

Rollouts of one prompt are contiguous (row i belongs to prompt i // n). A backend turns examples
into `Rollouts`; `HFBackend` uses transformers' `generate` (KV cache, left-padded prompts,
`chunk_size` sequences at a time to bound memory). A vLLM backend implements the same
`RolloutBackend` protocol (`generate` + `sync_weights`) and the trainers do not change.

`log_probs` are the sampling policy's log-probs of the sampled tokens under the
temperature-scaled distribution softmax(logits / T), recorded during generation without keeping
[N, T, V] logits. They agree with `prism.rollout.logprobs.token_log_probs` (a teacher-forced
forward) up to floating-point noise; top-k / top-p truncation is not reflected in them (as in
verl), so trainers recompute old log-probs with the same forward they train with.

Vision placeholder tokens (`<|image_pad|>`, `<|vision_start|>`, ...) are never sampled: fed back
in a response, they would be read as image slots. Their ids travel in `meta["suppress_ids"]`, and
the log-prob function excludes them too, so both describe the distribution actually sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from prism.data.collate import encode_prompts, text_position_ids
from prism.data.example import Example
from prism.models.loader import is_fully_sharded


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    n: int = 1
    """Samples per prompt (the group size G)."""

    def __post_init__(self):
        if self.n < 1 or self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling parameters: {self}")


# Per-row tensors of a prompt batch (everything else — pixel_values, image_grid_thw — is per image).
_ROW_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


@dataclass
class Rollouts:
    """N sampled responses with their prompts. Shapes: P prompt tokens (left-padded), T response tokens.

    prompt: processor outputs for the N prompts (input_ids / attention_mask [N, P], mm_token_type_ids,
        pixel_values [sum of patches, D], image_grid_thw [images, 3]).
    images_per_row: [N] number of images of each row's prompt (to slice pixel_values by row).
    response_ids [N, T] long, response_mask [N, T] bool (sampled tokens up to and including EOS),
    log_probs [N, T] float (sampling policy, 0 outside the mask).
    """

    prompt: dict[str, torch.Tensor]
    images_per_row: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    log_probs: torch.Tensor
    texts: list[str]
    finish_reasons: list[str]
    group_size: int = 1
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    @property
    def sequence_lengths(self) -> torch.Tensor:
        """[N] real tokens of each row: prompt (image tokens included) + response."""
        return self.prompt["attention_mask"].sum(-1) + self.response_lengths

    def select(self, rows: Sequence[int] | torch.Tensor) -> "Rollouts":
        """The rows `rows` (in that order), with columns that became all-padding trimmed."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        prompt = _select_prompt(self.prompt, self.images_per_row, rows)
        keep_p = prompt["attention_mask"].any(0)
        first = int(keep_p.nonzero()[0]) if keep_p.any() else 0
        for k in _ROW_KEYS:
            if k in prompt:
                prompt[k] = prompt[k][:, first:]
        t = int(self.response_mask[rows].sum(-1).max()) if len(rows) else 0
        return Rollouts(
            prompt=prompt, images_per_row=self.images_per_row[rows],
            response_ids=self.response_ids[rows, :t], response_mask=self.response_mask[rows, :t],
            log_probs=self.log_probs[rows, :t], texts=[self.texts[i] for i in rows.tolist()],
            finish_reasons=[self.finish_reasons[i] for i in rows.tolist()], group_size=self.group_size,
            meta=dict(self.meta),
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Forward inputs for [prompt ; response]: the layout generation used (left/right padding)."""
        p = self.prompt
        inputs = {
            "input_ids": torch.cat([p["input_ids"], self.response_ids], 1),
            "attention_mask": torch.cat([p["attention_mask"], self.response_mask.to(p["attention_mask"].dtype)], 1),
        }
        if "mm_token_type_ids" in p:
            inputs["mm_token_type_ids"] = torch.cat(
                [p["mm_token_type_ids"], torch.zeros_like(self.response_ids, dtype=p["mm_token_type_ids"].dtype)], 1)
        for k, v in p.items():
            if k not in _ROW_KEYS:
                inputs[k] = v
        if "pixel_values" not in inputs:
            # Text only: the model would number positions 0..L-1 ignoring the left padding; generation
            # counted only real tokens, so do the same here.
            inputs["position_ids"] = text_position_ids(inputs["attention_mask"])
        return inputs

    @staticmethod
    def concat(parts: Sequence["Rollouts"]) -> "Rollouts":
        """Stack rollouts (e.g. several generation rounds of DAPO's dynamic sampling)."""
        parts = [r for r in parts if len(r)]
        if len(parts) == 1:
            return parts[0]
        P = max(r.prompt["input_ids"].shape[1] for r in parts)
        T = max(r.response_ids.shape[1] for r in parts)
        prompt: dict[str, torch.Tensor] = {}
        for k in parts[0].prompt:
            vals = [r.prompt[k] for r in parts]
            if k in _ROW_KEYS:
                pad = 0 if k != "input_ids" else int(parts[0].meta.get("pad_token_id", 0))
                vals = [torch.nn.functional.pad(v, (P - v.shape[1], 0), value=pad) for v in vals]
            prompt[k] = torch.cat(vals, 0)

        def right(name, value=0):
            return torch.cat([torch.nn.functional.pad(getattr(r, name), (0, T - getattr(r, name).shape[1]),
                                                      value=value) for r in parts], 0)

        return Rollouts(
            prompt=prompt, images_per_row=torch.cat([r.images_per_row for r in parts]),
            response_ids=right("response_ids", int(parts[0].meta.get("pad_token_id", 0))),
            response_mask=right("response_mask", False), log_probs=right("log_probs", 0.0),
            texts=[t for r in parts for t in r.texts], finish_reasons=[f for r in parts for f in r.finish_reasons],
            group_size=parts[0].group_size, meta=dict(parts[0].meta),
        )


def _select_prompt(prompt: dict[str, torch.Tensor], images_per_row: torch.Tensor, rows: torch.Tensor) -> dict:
    out = {k: prompt[k][rows] for k in _ROW_KEYS if k in prompt}
    grid = prompt.get("image_grid_thw")
    if grid is not None:
        first_image = torch.cumsum(images_per_row, 0) - images_per_row  # [N] index of each row's first image
        image_idx = torch.cat([torch.arange(int(first_image[r]), int(first_image[r] + images_per_row[r]))
                               for r in rows.tolist()]) if len(rows) else torch.zeros(0, dtype=torch.long)
        patches = grid.prod(-1)  # rows of pixel_values per image
        first_patch = torch.cumsum(patches, 0) - patches
        patch_idx = (torch.cat([torch.arange(int(first_patch[i]), int(first_patch[i] + patches[i]))
                                for i in image_idx.tolist()]) if len(image_idx) else torch.zeros(0, dtype=torch.long))
        out["image_grid_thw"] = grid[image_idx]
        out["pixel_values"] = prompt["pixel_values"][patch_idx]
    return out


class RolloutBackend(Protocol):
    def generate(self, examples: Sequence[Example], params: SamplingParams) -> Rollouts:
        """Sample `params.n` responses for each example (rows of one example contiguous)."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the backend sample from `model`'s current weights (a no-op when it shares them)."""


class _LogProbRecorder(LogitsProcessor):
    """Records log softmax(logits / T) of each sampled token, keeping one [N, V] step at a time.

    A logits processor sees step t's logits together with the tokens sampled so far, so the
    log-prob of the token sampled at step t is read at step t + 1 (and after the loop for the last).
    """

    def __init__(self, temperature: float):
        self.temperature = temperature if temperature > 0 else 1.0
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def _take(self, tokens: torch.Tensor) -> None:
        if self.prev is not None:
            self.steps.append(self.prev.gather(-1, tokens[:, None]).squeeze(-1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def result(self, last_tokens: torch.Tensor) -> torch.Tensor:
        self._take(last_tokens)
        return torch.stack(self.steps, 1)


class HFBackend:
    """transformers `generate` with KV cache; prompts left-padded; `chunk_size` sequences per call."""

    def __init__(self, model: torch.nn.Module, processor, chunk_size: int = 64):
        self.model, self.processor, self.chunk_size = model, processor, chunk_size

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model

    def _vision_ids(self) -> list[int]:
        """Vision placeholder tokens: a sampled one would be read as an image slot by the next forward."""
        cfg = getattr(self.model, "config", None)
        names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        return sorted({i for i in (getattr(cfg, n, None) for n in names) if isinstance(i, int)})

    def _eos_ids(self) -> list[int]:
        ids = {self.processor.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None)
        ids.update(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
        return sorted(i for i in ids if i is not None)

    @torch.no_grad()
    def generate(self, examples: Sequence[Example], params: SamplingParams) -> Rollouts:
        tok = self.processor.tokenizer
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        expanded = [ex for ex in examples for _ in range(params.n)]
        eos, suppress = self._eos_ids(), self._vision_ids()
        greedy = params.temperature <= 0
        parts = []
        sharded = is_fully_sharded(model)
        if sharded:
            # FSDP2: transformers encodes the images before the first forward, outside FSDP's hooks, so the
            # root shard group (embeddings, output head, patch embedding, merger) is gathered for the call.
            # The root must be known first (it is set by the first forward through it, which may not have
            # happened yet; FSDP2 has no public call for it, and this one is a no-op once done).
            model._get_fsdp_state()._lazy_init()
            model.unshard()
        try:
            for i in range(0, len(expanded), self.chunk_size):
                chunk = expanded[i: i + self.chunk_size]
                prompt = encode_prompts(self.processor, chunk)
                recorder = _LogProbRecorder(params.temperature)
                # eager even where model.compile compiled the layers: one token per step, a new shape each time
                with torch.compiler.set_stance("force_eager"):
                    out = model.generate(
                        **{k: v.to(device) for k, v in prompt.items()},
                        max_new_tokens=params.max_new_tokens,
                        do_sample=not greedy,
                        temperature=None if greedy else params.temperature,
                        top_p=None if greedy else params.top_p,
                        top_k=None if greedy else params.top_k,
                        eos_token_id=eos,
                        pad_token_id=tok.pad_token_id,
                        suppress_tokens=suppress or None,
                        logits_processor=LogitsProcessorList([recorder]),
                        # every FSDP2 forward is a collective: a process that is done keeps stepping until all are
                        # (transformers detects ZeRO-3 by itself, not accelerate's fully_shard)
                        synced_gpus=True if sharded and torch.distributed.get_world_size() > 1 else None,
                    )
                response = out[:, prompt["input_ids"].shape[1]:].cpu()
                log_probs = recorder.result(response[:, -1].to(device)).cpu()
                is_eos = torch.isin(response, torch.tensor(eos))
                # Valid tokens: up to and including the first EOS (generate pads after it).
                after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
                mask = ~after_eos
                finished = is_eos.any(-1)
                texts = tok.batch_decode(response.masked_fill(~mask, tok.pad_token_id), skip_special_tokens=True)
                parts.append(Rollouts(
                    prompt=prompt,
                    images_per_row=torch.tensor([len(ex.images) for ex in chunk]),
                    response_ids=response.masked_fill(~mask, tok.pad_token_id),
                    response_mask=mask,
                    log_probs=log_probs.masked_fill(~mask, 0.0),
                    texts=texts,
                    finish_reasons=["stop" if f else "length" for f in finished.tolist()],
                    group_size=params.n,
                    meta={"pad_token_id": tok.pad_token_id, "suppress_ids": torch.tensor(suppress, dtype=torch.long)},
                ))
        finally:
            model.train(was_training)
            if sharded:
                model.reshard()
        return Rollouts.concat(parts)


def sample(model, processor, examples: Sequence[Example], params: SamplingParams, chunk_size: int = 64) -> Rollouts:
    """Sample `params.n` responses per example with the HF backend."""
    return HFBackend(model, processor, chunk_size).generate(examples, params)


def generate(model, processor, examples: Sequence[Example], params: SamplingParams, batch_size: int = 32) -> list[str]:
    """Response texts only (evaluation): one per example and sample, in order."""
    return sample(model, processor, examples, params, chunk_size=batch_size).texts
