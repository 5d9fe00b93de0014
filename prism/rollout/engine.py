"""The rollout engine: the only code in prism that samples from a model.

    rollouts = sample(model, processor, examples, SamplingParams(n=8, temperature=1.0, max_new_tokens=256))
    rollouts.response_ids, rollouts.response_mask, rollouts.log_probs   # [N, T], N = len(examples) * n
    rollouts.texts, rollouts.finish_reasons                              # N strings ("stop" | "length")

Rollouts of one prompt are contiguous (row i belongs to prompt i // n). A backend turns examples
into `Rollouts` (`prism.core.rollouts`); `HFBackend` uses transformers' `generate` (KV cache,
left-padded prompts, `chunk_size` sequences at a time to bound memory), with nothing of the checkpoint's
generation_config but its stop ids (`only_these_settings`). The trainers only see the
`RolloutBackend` protocol (`rollout` + `sync_weights`), built by `make_backend` from the config's
`rollout.backend`: `native` (`prism.rollout.native`: one prefill per prompt, a static KV cache, the
default), `hf`, or `vllm` (`prism.rollout.vllm_engine`: a colocated vLLM engine).

`log_probs` are the sampling policy's log-probs of the sampled tokens under the
temperature-scaled distribution softmax(logits / T), recorded during generation without keeping
[N, T, V] logits. They agree with `prism.models.logprobs.token_log_probs` (a teacher-forced
forward) up to floating-point noise; top-k / top-p truncation is not reflected in them (as in
verl), so trainers recompute old log-probs with the same forward they train with.

Vision placeholder tokens (`<|image_pad|>`, `<|vision_start|>`, ...) are never sampled: fed back
in a response, they would be read as image slots. Their ids travel in `Rollouts.suppress_ids`, and
the log-prob function excludes them too, so both describe the distribution actually sampled.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Protocol, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from prism.core.example import Example
from prism.core.rollouts import Rollouts, SamplingParams
from prism.data.collate import encode_prompts
from prism.models.loader import is_fully_sharded, unwrap
from prism.rollout.ids import eos_ids, vision_ids
from prism.rollout.native import NativeBackend, supports_native

log = logging.getLogger("prism.rollout")


class RolloutBackend(Protocol):
    def rollout(self, examples: Sequence[Example], params: SamplingParams) -> Rollouts:
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


@contextlib.contextmanager
def only_these_settings(model: torch.nn.Module, eos: list[int], pad: int | None):
    """Let `generate` sample from the policy alone during the block. transformers fills every setting a call
    leaves unset from the checkpoint's generation_config (Qwen2.5-VL's: repetition_penalty 1.05, top_k 1,
    top_p 0.001, temperature 0.1), which would draw tokens from, and record log-probs under, a distribution the
    trainer's π_old is not. Here the model's generation_config is a blank one holding only the stop and pad ids;
    the call's own arguments (prism's SamplingParams) are then all that shapes the distribution."""
    base = unwrap(model)
    saved = base.generation_config
    base.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    try:
        yield
    finally:
        base.generation_config = saved


class HFBackend:
    """transformers `generate` with KV cache; prompts left-padded; `chunk_size` sequences per call."""

    def __init__(self, model: torch.nn.Module, processor, chunk_size: int = 64):
        self.model, self.processor, self.chunk_size = model, processor, chunk_size

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model

    def _vision_ids(self) -> list[int]:
        return vision_ids(self.model)

    def _eos_ids(self) -> list[int]:
        return eos_ids(self.model, self.processor)

    @torch.no_grad()
    def rollout(self, examples: Sequence[Example], params: SamplingParams) -> Rollouts:
        model = self.model
        was_training = model.training
        model.eval()
        expanded = [ex for ex in examples for _ in range(params.n)]
        sharded = is_fully_sharded(model)
        if sharded:
            # FSDP2: transformers encodes the images before the first forward, outside FSDP's hooks, so the
            # root shard group (embeddings, output head, patch embedding, merger) is gathered for the call.
            # The root must be known first (it is set by the first forward through it, which may not have
            # happened yet; FSDP2 has no public call for it, and this one is a no-op once done).
            model._get_fsdp_state()._lazy_init()
            model.unshard()
        try:
            eos, suppress = self._eos_ids(), self._vision_ids()
            parts = [self._chunk(expanded[i: i + self.chunk_size], params, eos, suppress, sharded)
                     for i in range(0, len(expanded), self.chunk_size)]
        finally:
            model.train(was_training)
            if sharded:
                model.reshard()
        return Rollouts.concat(parts)

    def _chunk(self, chunk: list[Example], params: SamplingParams, eos: list[int], suppress: list[int],
               sharded: bool) -> Rollouts:
        """One `generate` call over `chunk` (`rollout` repeated each example n times), stopping at the `eos`
        ids and never sampling the `suppress` ids."""
        tok, model = self.processor.tokenizer, self.model
        device = next(model.parameters()).device
        greedy = params.temperature <= 0
        prompt = encode_prompts(self.processor, chunk)
        recorder = _LogProbRecorder(params.temperature)
        # eager even where model.compile compiled the layers: one token per step, a new shape each time
        with torch.compiler.set_stance("force_eager"), only_these_settings(model, eos, tok.pad_token_id):
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
        mask = ~((is_eos.cumsum(-1) - is_eos.long()) > 0)
        finished = is_eos.any(-1)
        return Rollouts(
            prompt=prompt,
            images_per_row=torch.tensor([len(ex.images) for ex in chunk]),
            response_ids=response.masked_fill(~mask, tok.pad_token_id),
            response_mask=mask,
            log_probs=log_probs.masked_fill(~mask, 0.0),
            texts=tok.batch_decode(response.masked_fill(~mask, tok.pad_token_id), skip_special_tokens=True),
            finish_reasons=["stop" if f else "length" for f in finished.tolist()],
            suppress_ids=torch.tensor(suppress, dtype=torch.long),
            pad_token_id=tok.pad_token_id,
            group_size=params.n,
        )


BACKENDS = {"hf": HFBackend, "native": NativeBackend}
_WARNED: set[str] = set()
"""`rollout.backend` name -> backend class (constructed by `make_backend`)."""


def make_backend(name: str, model: torch.nn.Module, processor, chunk_size: int = 64,
                 compile: bool = False, vllm=None, model_path: str | None = None) -> RolloutBackend:
    """The rollout backend `name` (config key `rollout.backend`) sampling from `model`. `compile`: the native
    sampler's compiled decode step (`rollout.compile`). A model the native sampler cannot run (sharded
    weights, another architecture) is sampled by the HF backend, with a warning saying why. `vllm`: the
    engine settings (`rollout.vllm`) and `model_path` the folder it loads (`model.path`) for name "vllm"."""
    if name == "vllm":
        from prism.core.config import VLLMSettings
        from prism.rollout.vllm_engine import VLLMBackend

        if model_path is None:
            raise ValueError("rollout.backend=vllm: the engine needs the model's folder (model_path)")
        return VLLMBackend(model, processor, model_path, vllm or VLLMSettings(), chunk_size)
    if name == "native":
        why = supports_native(model)
        if why is None:
            return NativeBackend(model, processor, chunk_size, compile=compile)
        if why not in _WARNED:  # once per reason (evaluation builds a backend per call)
            _WARNED.add(why)
            log.warning("rollout.backend=native: %s; sampling with the hf backend instead", why)
        name = "hf"
    return BACKENDS[name](model, processor, chunk_size)


def sample(model, processor, examples: Sequence[Example], params: SamplingParams, chunk_size: int = 64,
           backend: str | RolloutBackend = "hf") -> Rollouts:
    """Sample `params.n` responses per example with the backend named `backend` (or that backend object,
    e.g. a vLLM engine built once for several calls)."""
    if isinstance(backend, str):
        backend = make_backend(backend, model, processor, chunk_size)
    return backend.rollout(examples, params)


def sample_texts(model, processor, examples: Sequence[Example], params: SamplingParams,
                 chunk_size: int = 32, backend: str | RolloutBackend = "hf") -> list[str]:
    """Response texts only (evaluation): one per example and sample, in order."""
    return sample(model, processor, examples, params, chunk_size=chunk_size, backend=backend).texts
