"""The MoE discriminator of PRISM (docs/design.md §4): a perception expert D_v that scores the caption and a
reasoning expert D_r that scores the think section of a response, both conditioned on the prompt
and (unless `text_only`) its image.

    from prism.align import MoEDiscriminator
    D = MoEDiscriminator.from_pretrained("runs/tiny-model")              # fresh experts on a VLM backbone
    scores = D.score(examples, responses)   # {"perception": Tensor[N], "reasoning": Tensor[N]}
    D.save_pretrained("runs/disc"); D2 = MoEDiscriminator.from_pretrained("runs/disc")   # same scores

A score is a scalar head on the backbone's last hidden state at the last real token of
[prompt (+ image) ; segment] — read by position from the attention mask, so left and right
padding give the same score — clipped to ±score_clip.

Expert implementations behind the same interface (`experts`):
- `adapters` (default): one frozen Qwen-VL backbone, one LoRA adapter + scalar head per expert. The
  experts share no trainable parameter, so the perception loss never moves the reasoning expert.
- `upcycled`: a Qwen3-VL-MoE backbone sparse-upcycled from a dense Qwen3-VL
  (`prism-align upcycle`, `prism.align.upcycle`), trained in full with a router; one scalar head
  per component, and the router's load-balancing loss is returned for the discriminator loss.
Ablations: `dense` (one scorer for both components, no experts) and `text_only` (the image is
never shown: prompts are rendered without it and no pixel values are passed).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from pydantic import Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForImageTextToText

from prism.align.losses import COMPONENTS, SECTION_OF
from prism.core.batching import text_position_ids
from prism.core.config import LM_PROJECTIONS, Section, one_line_error
from prism.core.errors import ConfigError, DataError
from prism.core.example import IMAGE_PLACEHOLDER, Example
from prism.core.response import ParsedResponse, parse_response
from prism.data.collate import render
from prism.data.images import example_images
from prism.models.loader import (
    check_model_dir,
    check_weights,
    first_line,
    read_json_object,
    resolve_dtype,
)
from prism.models.processor import load_processor

CONFIG_FILE = "discriminator.json"
HEADS_FILE = "heads.safetensors"
LOAD_OPTIONS = ("dtype", "attn_implementation", "extra")
"""Keys of discriminator.json files from earlier versions that are not part of the config (load options)."""


class DiscriminatorConfig(Section):
    """What a discriminator is (saved with it as discriminator.json); the stage config's `discriminator`
    section adds how it trains (`prism.align.config.DiscriminatorSettings`)."""

    experts: Literal["adapters", "upcycled"] = "adapters"
    """adapters: shared frozen backbone + one LoRA adapter and head per expert; upcycled: a Qwen3-VL-MoE
    backbone (`prism-align upcycle`) trained in full, one head per component."""
    dense: bool = False
    """Ablation: one shared scorer for caption and think (no experts)."""
    text_only: bool = False
    """Ablation: the discriminator never sees the image."""
    score_clip: float = Field(10.0, gt=0)
    lora_r: int = Field(16, gt=0)
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: str | list[str] = LM_PROJECTIONS
    aux_loss_coef: float = Field(0.01, ge=0)
    """Weight of the router's load-balancing loss (upcycled)."""
    gradient_checkpointing: bool = False
    """Recompute the backbone's layer activations in the backward pass (long responses, big backbones)."""
    reasoning_span: Literal["think", "think_answer"] = "think"
    """What the reasoning expert scores: the <think> section (default: the expert judges the reasoning,
    the answer is judged by the verifier in RL), or <think> followed by <answer> as the reference
    implementation does."""

    @property
    def scorers(self) -> tuple[str, ...]:
        return ("shared",) if self.dense else COMPONENTS


def _config(values: dict, origin: str = "discriminator") -> DiscriminatorConfig:
    try:
        return DiscriminatorConfig(**values)
    except ValidationError as e:
        raise ConfigError(one_line_error(e, origin)) from None


@dataclass
class DiscriminatorOutput:
    scores: torch.Tensor
    """[N] clipped scalar scores."""
    aux_loss: torch.Tensor | None = None
    """Router load-balancing loss (upcycled backbones), else None."""


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[N] index of the last attended position of each row, for left or right padding alike."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(1).long().argmax(1)


def _strip_images(messages: Sequence[dict]) -> list[dict]:
    return [{**m, "content": m["content"].replace(IMAGE_PLACEHOLDER, "")} for m in messages]


class MoEDiscriminator(nn.Module):
    """Perception and reasoning experts on one VLM backbone; see the module docstring."""

    def __init__(self, backbone: nn.Module, processor, config: DiscriminatorConfig, source: Path | None = None):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.processor = processor
        self._source = source  # where the frozen base weights of an adapters backbone came from
        self._active: str | None = None  # the expert whose adapter the backbone runs through
        hidden = self._base().config.get_text_config().hidden_size
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, 1) for name in config.scorers})
        for head in self.heads.values():  # a reward-model head: small weights, zero bias
            nn.init.normal_(head.weight, std=1.0 / (hidden + 1) ** 0.5)
            nn.init.zeros_(head.bias)
        self.to(next(backbone.parameters()).dtype)
        self._check_tokenizer()

    # ------------------------------------------------------------------------------ building

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: str = "auto", attn_implementation: str = "sdpa",
                        key: str = "discriminator.path", chat_template: str = "auto",
                        image_pixels: tuple[int | None, int | None] = (None, None),
                        **overrides) -> "MoEDiscriminator":
        """A saved discriminator (a directory with discriminator.json), or fresh experts on any
        local Qwen-VL directory the loader accepts (`overrides` are DiscriminatorConfig fields).
        `chat_template` (`discriminator.chat_template`) and `image_pixels` (data.image_min_pixels,
        data.image_max_pixels) set up its processor as `prism.models.processor.load_processor` does.
        A fault in the directory's files is one line naming `key` and the file."""
        path = Path(path)
        load = dict(dtype=dtype, attn_implementation=attn_implementation, key=key, chat_template=chat_template,
                    image_pixels=image_pixels)
        if (path / CONFIG_FILE).is_file():
            saved = read_json_object(path / CONFIG_FILE, key)
            for name in ("experts", "dense"):  # the layout of the saved experts cannot change on load
                if name in overrides and name in saved and overrides[name] != saved[name]:
                    raise ConfigError(f"discriminator.{name}: {path} was saved with {name}={saved[name]!r}, "
                                      f"cannot load it as {name}={overrides[name]!r}")
            for name in LOAD_OPTIONS:  # files written before the config was unified also held these
                saved.pop(name, None)
            config = _config({**saved, **overrides}, origin=str(path / CONFIG_FILE))
            for f in [path / HEADS_FILE, *sorted((path / "adapters").rglob("*.safetensors"))]:
                check_weights(f, key)
            disc = cls._build(path / "backbone", path, config, adapters=path / "adapters", **load)
            try:
                disc.heads.load_state_dict(load_file(str(path / HEADS_FILE)))
            except (SafetensorError, RuntimeError) as e:  # RuntimeError: heads of another shape or names
                raise DataError(f"{key}: cannot load {path / HEADS_FILE} ({first_line(e)})") from None
            return disc
        return cls._build(path, path, _config(overrides), **load)

    @classmethod
    def _build(cls, backbone_dir: Path, processor_dir: Path, config: DiscriminatorConfig,
               adapters: Path | None = None, dtype: str = "auto", attn_implementation: str = "sdpa",
               key: str = "discriminator.path", chat_template: str = "auto",
               image_pixels: tuple[int | None, int | None] = (None, None)) -> "MoEDiscriminator":
        check_model_dir(backbone_dir, key=key)  # config.json and the weights' headers
        # the discriminator tokenizes with its own processor
        processor = load_processor(processor_dir, key=key, chat_template=chat_template,
                                   template_key="discriminator.chat_template", min_pixels=image_pixels[0],
                                   max_pixels=image_pixels[1])
        try:
            base = AutoModelForImageTextToText.from_pretrained(
                backbone_dir, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation,
                use_safetensors=True)
        except (OSError, ValueError, SafetensorError) as e:
            raise DataError(f"{key}: cannot load the backbone in {backbone_dir} ({first_line(e)})") from None
        model_type = base.config.model_type
        if config.experts == "upcycled" and "moe" not in model_type:
            raise ConfigError(f"discriminator.experts=upcycled needs a MoE backbone, {backbone_dir} is {model_type}; "
                              "make one with `prism-align upcycle --model DIR --out DIR`")
        base.requires_grad_(False)
        if config.experts == "adapters":
            backbone = cls._with_adapters(base, config, adapters)
        else:
            backbone = base
            for name, p in base.named_parameters():  # the language model trains; vision stays frozen
                p.requires_grad_(".visual." not in f".{name}")
        if config.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return cls(backbone, processor, config, source=backbone_dir)

    @staticmethod
    def _with_adapters(base: nn.Module, config: DiscriminatorConfig, saved: Path | None) -> nn.Module:
        from peft import LoraConfig, PeftModel, get_peft_model

        names = config.scorers
        if saved is not None:
            model = PeftModel.from_pretrained(base, saved / names[0], adapter_name=names[0], is_trainable=True)
            for name in names[1:]:
                model.load_adapter(saved / name, adapter_name=name, is_trainable=True)
            return model
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=config.lora_target_modules)
        model = get_peft_model(base, lora, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, lora)
        return model

    def _check_tokenizer(self) -> None:
        n_tokens = len(self.processor.tokenizer)
        vocab = self._base().config.get_text_config().vocab_size
        if n_tokens > vocab:
            raise ConfigError(f"discriminator.path: its tokenizer has {n_tokens} tokens but the backbone embeds "
                              f"only {vocab}: the processor does not belong to this backbone")

    def _base(self) -> nn.Module:
        """The underlying *ForConditionalGeneration model (inside the peft wrapper, if any)."""
        return self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone

    # ------------------------------------------------------------------------------ saving

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a self-contained directory that `from_pretrained` reloads to the same scores."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.config.experts == "adapters":
            self.backbone.save_pretrained(path / "adapters", safe_serialization=True)
            self._copy_frozen_backbone(path / "backbone")
        else:
            self.backbone.save_pretrained(path / "backbone", safe_serialization=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()}, str(path / HEADS_FILE))
        self.processor.save_pretrained(path)
        (path / CONFIG_FILE).write_text(json.dumps(self.config.model_dump(mode="json"), indent=2) + "\n")
        return path

    def _copy_frozen_backbone(self, dest: Path) -> None:
        """The adapters' base weights never change: link (or copy) the files they were loaded from."""
        dest.mkdir(parents=True, exist_ok=True)
        wanted = [*self._source.glob("*.safetensors"), *self._source.glob("*.safetensors.index.json"),
                  *(self._source / n for n in ("config.json", "generation_config.json"))]
        for f in wanted:
            if not f.is_file():
                continue
            target = dest / f.name
            target.unlink(missing_ok=True)
            try:
                os.link(f, target)
            except OSError:  # another file system
                shutil.copy2(f, target)

    # ------------------------------------------------------------------------------ scoring

    def scorer_of(self, component: str) -> str:
        if component not in COMPONENTS:
            raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
        return "shared" if self.config.dense else component

    @property
    def device(self) -> torch.device:
        return next(self.heads.parameters()).device

    def segment(self, parsed: ParsedResponse, component: str) -> str:
        """What the expert of `component` scores of a response, tags included: `<caption>c</caption>`, or
        `<think>t</think>` (`reasoning_span=think_answer`: followed by `<answer>a</answer>`). A missing
        section is scored as empty."""
        tag = SECTION_OF[component]
        text = f"<{tag}>{getattr(parsed, tag) or ''}</{tag}>"
        if component == "reasoning" and self.config.reasoning_span == "think_answer":
            text += f"<answer>{parsed.answer or ''}</answer>"
        return text

    def encode(self, examples: Sequence[Example], segments: Sequence[str], component: str,
               padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Tensors for one component: [prompt (+ image) ; <section>segment</section>] per row, from the
        section's text alone (`encode_parsed` scores parsed responses as `segment` says)."""
        tag = SECTION_OF[component]
        return self._encode_texts(examples, [f"<{tag}>{seg}</{tag}>" for seg in segments], padding_side)

    def encode_parsed(self, examples: Sequence[Example], parsed: Sequence[ParsedResponse], component: str,
                      padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Tensors for one component: [prompt (+ image) ; `segment(response, component)`] per row."""
        return self._encode_texts(examples, [self.segment(p, component) for p in parsed], padding_side)

    def _encode_texts(self, examples: Sequence[Example], tagged: Sequence[str],
                      padding_side: str) -> dict[str, torch.Tensor]:
        texts, prompt_examples = [], []
        for ex, seg in zip(examples, tagged):
            messages = _strip_images(ex.prompt_messages) if self.config.text_only else ex.prompt_messages
            texts.append(render(self.processor, messages, add_generation_prompt=True) + seg)
            prompt_examples.append(ex)
        images = [] if self.config.text_only else example_images(self.processor, prompt_examples, prompt_only=True)
        tok = self.processor.tokenizer
        tok.padding_side = padding_side
        try:
            batch = dict(self.processor(text=texts, images=images or None, padding=True, return_tensors="pt"))
        finally:
            tok.padding_side = "right"
        if "pixel_values" not in batch:
            batch.pop("mm_token_type_ids", None)
            batch["position_ids"] = text_position_ids(batch["attention_mask"])
        return batch

    def forward(self, inputs: dict[str, torch.Tensor], component: str) -> DiscriminatorOutput:
        """Scores [N] of one component from `encode`d inputs (gradients flow to its expert only)."""
        scorer = self.scorer_of(component)
        if self.config.experts == "adapters":
            self._activate(scorer)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        upcycled = self.config.experts == "upcycled"
        out = self._base().model(**inputs, use_cache=False, **({"output_router_logits": True} if upcycled else {}))
        hidden = out.last_hidden_state
        last = last_token_index(inputs["attention_mask"])
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        scores = self.heads[scorer](h).squeeze(-1).float().clamp(-self.config.score_clip, self.config.score_clip)
        aux = None
        if upcycled and getattr(out, "router_logits", None):
            from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import (
                load_balancing_loss_func,
            )

            text = self._base().config.text_config
            aux = load_balancing_loss_func(out.router_logits, text.num_experts, text.num_experts_per_tok,
                                           inputs["attention_mask"])
        return DiscriminatorOutput(scores, aux)

    def _activate(self, scorer: str) -> None:
        """Route the backbone through one expert's adapter. peft's set_adapter also freezes the
        others; they are unfrozen again so one optimizer owns every expert (an inactive adapter takes
        no part in the forward, so it still gets no gradient)."""
        if self._active != scorer:
            self.backbone.set_adapter(scorer)
            for name, p in self.backbone.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True)
            self._active = scorer

    @torch.no_grad()
    def score(self, examples: Sequence[Example], responses: Sequence[str], batch_size: int = 32,
              padding_side: str = "right") -> dict[str, torch.Tensor]:
        """{"perception": [N], "reasoning": [N]} for raw examples and response texts (a missing
        section is scored as empty)."""
        parsed = [parse_response(r) for r in responses]
        out: dict[str, torch.Tensor] = {}
        was_training = self.training
        self.eval()
        try:
            for comp in COMPONENTS:
                chunks = []
                for i in range(0, len(examples), batch_size):
                    inputs = self.encode_parsed(examples[i: i + batch_size], parsed[i: i + batch_size], comp,
                                                padding_side)
                    chunks.append(self(inputs, comp).scores.cpu())
                out[comp] = torch.cat(chunks) if chunks else torch.zeros(0)
        finally:
            self.train(was_training)
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.config.experts == "adapters":
            params = [p for n, p in self.backbone.named_parameters() if "lora_" in n]
        else:
            params = [p for p in self.backbone.parameters() if p.requires_grad]
        return params + list(self.heads.parameters())

    def expert_parameters(self, scorer: str) -> dict[str, nn.Parameter]:
        """Parameters owned by one expert alone (adapters: its LoRA weights and its head)."""
        own = {f"heads.{scorer}.{n}": p for n, p in self.heads[scorer].named_parameters()}
        if self.config.experts == "adapters":
            own.update({n: p for n, p in self.backbone.named_parameters() if "lora_" in n and f".{scorer}." in n})
        return own
