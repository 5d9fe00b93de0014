"""GRPO training throughput: prism's RL loop vs TRL's `GRPOTrainer`, same model, data and settings.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/grpo_vs_trl.py \
        [--steps 4] [--repeats 2] [--batch 4] [--group 4] [--max-new-tokens 64] [--threads 1] \
        [--backends native,hf] [--compile] [--workdir /tmp/grpo-bench]

What is compared. Both frameworks train the same tiny random Qwen3-VL (built offline with
`prism.models.tiny.build_tiny`) on the same synthetic image+question RL prompts
(`prism.tasks.grids.generator`), for `--steps` GRPO steps each: `--batch` prompts per step, `--group`
sampled responses per prompt, at most `--max-new-tokens` new tokens, temperature 1, top-p 1, no
top-k, the same reward (response length in characters / 100, so groups get unequal rewards and the
backward pass carries real gradients), lr 1e-6 constant, no KL term (no reference model), one
policy update per batch (old log-probs = detached current ones, so neither spends an extra
forward), gradient clipping at 1.0, the vision tower and projector frozen, float32, no gradient
checkpointing, `--threads` intra-op threads. Runs alternate prism, TRL, prism, TRL, ...
(`--repeats` rounds, each from the same initial weights) so that machine noise hits both.

What is measured. A step is everything from "sample a batch" to "optimizer step done": prompt
encoding, generation, reward, advantages, the loss forward/backward, clipping, optimizer and
scheduler. prism: its own logged `time/step` (the checkpoint saved at the end of a run is outside
it). TRL: `time.perf_counter()` at the trainer's `on_step_begin` / `on_step_end` callbacks. The
first step of every run is a warm-up and is left out of the totals (when `--steps` > 1).

"Generated tokens" are the response tokens actually sampled: per sequence, every token up to and
including the first EOS (or `max-new-tokens` tokens if none was sampled), padding excluded, summed
over the B x G sequences of a step. prism logs `rollout/length`, the mean of exactly this count
over the step's sequences; TRL's reward function receives `completion_ids`, the sampled ids already
cut after the first EOS with padding removed, and sums their lengths. Throughput = generated tokens
/ step seconds. The last line printed is `throughput ratio prism/trl: X.XX` for the first of `--backends`
(prism's rollout backend: `native`, its default, or `hf`, transformers' `generate` as TRL uses); with
several, each gets its own prism row and ratio. `--compile` compiles the native sampler's decode step
(`rollout.compile=true`; its compile falls in the warm-up step).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin on a shared CPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local

import argparse
import json
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from prism.core.config import load_config
from prism.rl.config import RLConfig
from prism.data.collate import to_chat
from prism.core.example import load_image
from prism.data.formats import load_examples
from prism.tasks.grids.generator import SynthConfig, generate
from prism.models.loader import freeze
from prism.models.processor import load_processor
from prism.models.tiny import build_tiny
from prism.rl.train import train as prism_train

REWARD_MODULE = "bench_rewards"
# One reward for both frameworks, imported by prism by name and called by TRL through a wrapper.
REWARD_SOURCE = '''"""Benchmark reward: response length (characters). Random-model groups get unequal rewards."""


def length(responses, examples):
    return [len(r) / 100.0 for r in responses]
'''
LR = 1e-6


def prepare(workdir: Path, batch: int) -> tuple[Path, Path]:
    """Tiny model, synthetic RL prompts and the reward module, built once and reused."""
    model_dir, data_dir = workdir / "model", workdir / "data"
    if not (model_dir / "config.json").is_file():
        build_tiny(model_dir)
    if not (data_dir / "rl.jsonl").is_file():
        generate(SynthConfig(out=str(data_dir), n=64, n_rl=max(32, 2 * batch), seed=0))
    (workdir / f"{REWARD_MODULE}.py").write_text(REWARD_SOURCE)
    sys.path.insert(0, str(workdir))
    return model_dir, data_dir / "rl.jsonl"


# ---------------------------------------------------------------------------------------------- prism

def run_prism(a, model_dir: Path, data: Path, out: Path, seed: int, backend: str = "native") -> list[dict]:
    """K prism GRPO steps; per step: seconds, generated tokens, generation seconds, grad norm."""
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resume
    n = a.batch * a.group
    overrides = {
        "model.path": model_dir, "data.train": data, "data.eval": "null", "train.output_dir": out,
        "train.max_steps": a.steps, "train.prompts_per_step": a.batch, "train.seed": seed, "train.save_every": 0,
        "train.resume": "none", "train.cpu": "true", "train.log_every": 1,
        "rollout.group_size": a.group, "rollout.max_new_tokens": a.max_new_tokens,
        "rollout.temperature": 1.0, "rollout.top_p": 1.0, "rollout.top_k": 0, "rollout.backend": backend,
        "rollout.compile": str(a.compile).lower(),
        # One generate call and one forward/backward for the whole batch, as TRL does below.
        "rollout.chunk_size": n, "algo.micro_batch_size": n,
        "algo.name": "grpo", "algo.kl_coef": 0.0, "algo.ppo_epochs": 1, "algo.mini_batches": 1,
        "algo.dynamic_sampling": "false",
        "optim.lr": LR, "optim.scheduler": "constant", "optim.warmup_ratio": 0.0, "optim.max_grad_norm": 1.0,
        "reward.functions": json.dumps({f"{REWARD_MODULE}:length": 1.0}),
        "logging.tensorboard": "false",
    }
    prism_train(load_config(RLConfig, None, [f"{k}={v}" for k, v in overrides.items()]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # rollout/length is the float mean of integer per-sequence counts over the n sequences;
    # times n and rounded it is their exact sum.
    return [{"seconds": r["time/step"], "tokens": round(r["rollout/length"] * n),
             "gen_seconds": r["time/generation"], "grad_norm": r["actor/grad_norm"]} for r in rows]


# ---------------------------------------------------------------------------------------------- TRL

def trl_dataset(data: Path):
    """The same prompts in TRL's conversational VLM format: `prompt` messages with `{"type": "image"}`
    parts (filled by TRL from the `images` column) and `images` as PIL images."""
    from datasets import Dataset

    examples = load_examples(str(data), "auto", require_answer=True)
    return Dataset.from_list([{"prompt": to_chat(ex.prompt_messages),
                               "images": [load_image(ref, ex.source) for ref in ex.images]} for ex in examples])


def run_trl(a, model_dir: Path, dataset, out: Path, seed: int) -> list[dict]:
    """K TRL GRPO steps; per step: seconds, generated tokens, generation seconds, grad norm."""
    import bench_rewards
    from transformers import AutoModelForImageTextToText, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    shutil.rmtree(out, ignore_errors=True)
    tokens: list[int] = []  # one entry per step: the reward is called once per generation batch

    def length(prompts, completions, completion_ids, **kwargs):
        # completion_ids: per sequence, the sampled ids up to and including the first EOS, unpadded.
        tokens.append(sum(len(ids) for ids in completion_ids))
        return bench_rewards.length([c[-1]["content"] for c in completions], None)

    class Timer(TrainerCallback):
        def __init__(self):
            self.seconds, self.grad_norms, self.t0 = [], [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "grad_norm" in logs:
                self.grad_norms.append(float(logs["grad_norm"]))

    gen_seconds: list[float] = []

    class TimedGRPOTrainer(GRPOTrainer):
        # `_generate` = chat template + processor on the prompts, `generate`, decode: the same span
        # as prism's `time/generation` (encode_prompts, generate, decode).
        def _generate(self, prompts):
            t0 = time.perf_counter()
            try:
                return super()._generate(prompts)
            finally:
                gen_seconds.append(time.perf_counter() - t0)

    processor = load_processor(model_dir)
    processor.tokenizer.padding_side = "left"  # TRL requires it (its processor call pads prompt-side fields)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    freeze(model, vision=True, projector=True)  # prism's defaults: only the language model trains
    cfg = model.config
    # prism never samples vision placeholder tokens; TRL suppresses only the image pad by default.
    suppress = sorted({cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id})
    args = GRPOConfig(
        output_dir=str(out), seed=seed, max_steps=a.steps,
        # TRL's batch counts sequences: B prompts x G generations, one generation per step.
        per_device_train_batch_size=a.batch * a.group, gradient_accumulation_steps=1, num_generations=a.group,
        max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"suppress_tokens": suppress},
        # GRPO as prism runs it: per-sequence token mean then batch mean, std-scaled group advantages,
        # clip 0.2, no KL, a single update per batch.
        loss_type="grpo", scale_rewards="group", epsilon=0.2, beta=0.0, num_iterations=1,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,  # TRL defaults these on
        use_vllm=False, logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0,
        disable_tqdm=True, log_completions=False,
    )
    timer = Timer()
    trainer = TimedGRPOTrainer(model=model, reward_funcs=length, args=args, train_dataset=dataset,
                               processing_class=processor, callbacks=[timer])
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):  # no per-step dicts on stdout
        trainer.remove_callback(cb)
    trainer.train()
    return [{"seconds": s, "tokens": t, "gen_seconds": g, "grad_norm": n}
            for s, t, g, n in zip(timer.seconds, tokens, gen_seconds, timer.grad_norms, strict=True)]


# ---------------------------------------------------------------------------------------------- main

def summary(name: str, steps: list[dict], n: int) -> float:
    secs = sum(s["seconds"] for s in steps)
    toks = sum(s["tokens"] for s in steps)
    gen = sum(s["gen_seconds"] for s in steps)
    tps = toks / secs
    print(f"{name:<13} {tps:8.1f} generated tokens/s | {secs / len(steps):6.2f} s/step "
          f"(generation {gen / len(steps):5.2f} s, rest {(secs - gen) / len(steps):5.2f} s) | "
          f"{toks / len(steps) / n:5.1f} tokens/sequence | {len(steps)} steps | "
          f"mean grad norm {statistics.fmean(s['grad_norm'] for s in steps):.3g}")
    return tps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="GRPO steps per run")
    p.add_argument("--repeats", type=int, default=2, help="rounds of (prism run, TRL run)")
    p.add_argument("--batch", type=int, default=4, help="prompts per step (B)")
    p.add_argument("--group", type=int, default=4, help="samples per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both frameworks)")
    p.add_argument("--backends", default="native", help="prism's rollout backend(s), comma-separated: native, hf")
    p.add_argument("--compile", action="store_true", help="native: compile the decode step (rollout.compile)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/grpo-bench"))
    a = p.parse_args(argv)
    backends = a.backends.split(",")
    if not set(backends) <= {"native", "hf"}:
        p.error(f"--backends: native and/or hf, got {a.backends}")
    if a.steps < 1 or a.repeats < 1 or a.batch < 1 or a.group < 2 or a.max_new_tokens < 1 or a.threads < 1:
        p.error("need --steps, --repeats, --batch, --max-new-tokens, --threads >= 1 and --group >= 2")
    torch.set_num_threads(a.threads)
    a.workdir.mkdir(parents=True, exist_ok=True)
    model_dir, data = prepare(a.workdir, a.batch)
    n = a.batch * a.group
    print(f"GRPO: B={a.batch} prompts x G={a.group} samples, max {a.max_new_tokens} new tokens, T=1.0, "
          f"{a.steps} steps x {a.repeats} rounds, {torch.get_num_threads()} thread(s), model {model_dir}", flush=True)

    skip = 1 if a.steps > 1 else 0  # warm-up step of every run
    names = [f"prism[{b}]" for b in backends] + ["trl"]
    results: dict[str, list[dict]] = {name: [] for name in names}
    dataset, trl_error = None, None
    for r in range(a.repeats):
        for name in names:
            out = a.workdir / "runs" / f"{name}-r{r}"
            if name.startswith("prism"):
                steps = run_prism(a, model_dir, data, out, seed=r, backend=name[6:-1])
            elif trl_error:
                continue
            else:
                try:
                    dataset = dataset if dataset is not None else trl_dataset(data)
                    steps = run_trl(a, model_dir, dataset, out, seed=r)
                except Exception as e:  # noqa: BLE001 - whatever breaks TRL, keep prism's numbers and say why
                    traceback.print_exc()
                    trl_error = f"{type(e).__name__}: {e}"
                    continue
            if len(steps) != a.steps:
                raise RuntimeError(f"{name}: {len(steps)} timed steps recorded, expected {a.steps}")
            print(f"round {r} {name:<13} s/step " + " ".join(f"{s['seconds']:.2f}" for s in steps)
                  + " | tokens/step " + " ".join(str(s["tokens"]) for s in steps), flush=True)
            results[name] += steps[skip:]

    print(f"\nper framework, {len(results['trl'] or results[names[0]])} timed steps each"
          + (" (first step of each run excluded as warm-up)" if skip else "") + ":")
    prism_tps = {name: summary(name, results[name], n) for name in names[:-1]}
    if trl_error or not results["trl"]:
        print(f"TRL could not run, no ratio: {trl_error}")
        return
    trl_tps = summary("trl", results["trl"], n)
    for name in reversed(names[:-1]):  # the first backend's ratio is the last line
        print(f"throughput ratio {'prism' if name == names[0] else name}/trl: {prism_tps[name] / trl_tps:.2f}")


if __name__ == "__main__":
    main()
