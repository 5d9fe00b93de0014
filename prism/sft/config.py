"""`prism-sft`'s config: the shared sections (`prism.core.config`) and SFT's own `train` section."""

from __future__ import annotations

from pydantic import Field

from prism.core.config import (
    DataSettings,
    EvalSettings,
    LoggingSettings,
    ModelSettings,
    OptimSettings,
    RunSettings,
    Section,
)


class SFTTrainSettings(RunSettings):
    output_dir: str = "runs/sft"
    micro_batch_size: int = Field(8, gt=0)
    """Demonstrations per forward/backward per process."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step (global batch = micro_batch_size * grad_accum * processes)."""
    micro_token_budget: int | None = Field(None, gt=0)
    """Split each micro-batch into forwards of at most this many padded tokens (examples x longest),
    similar lengths together; the batch and so the update stay the same, peak memory drops."""
    padding_free: bool = False
    """Pack each forward's examples into one row without padding (block-diagonal attention, each
    sequence's own positions): the same loss, no compute on padding (prism.data.packing)."""
    logits_chunk: int = Field(2048, ge=0)
    """Labelled positions per output-head slice: the loss never builds [batch, tokens, vocab] logits,
    and the head runs on labelled tokens only (prism.losses.sft.head_token_nll). 0: the model's
    full logits (shifted_token_nll)."""


class SFTConfig(Section):
    """`prism-sft`: supervised fine-tuning on demonstrations, loss on assistant tokens only."""

    renamed = {"train.batch_size": "train.micro_batch_size", "eval.batch_size": "eval.chunk_size"}

    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    optim: OptimSettings = OptimSettings()
    train: SFTTrainSettings = SFTTrainSettings()
    eval: EvalSettings = EvalSettings()
    logging: LoggingSettings = LoggingSettings()
