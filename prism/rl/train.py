"""Stage 3 — RLVR with GRPO, DAPO or GSPO and verifiable rewards (docs/design.md §5).

    prism-rl --algo grpo --config configs/rl/demo.yaml [rollout.group_size=8 optim.lr=1e-6 ...]
    prism-rl filter --model DIR --data FILE --k 8 --band 0,1 --max-n 2000 --out FILE
    accelerate launch --config_file configs/accelerate/ddp.yaml -m prism.rl.train --algo dapo --config ...

One step, top to bottom: take the next `train.prompts_per_step` prompts per process → sample
`rollout.group_size` responses each (the rollout engine) → rewards (0.8·accuracy + 0.2·format by
default; DAPO adds overlong shaping) → under dynamic sampling, drop groups that are uniform in
`algo.filter_metric` (their accuracy, by default, or their total reward) and sample more prompts
until the batch is full → group-relative advantages → the clipped
policy update (`prism.loop.policy_update`, the same one ALIGN uses; KL to a reference only when
`algo.kl_coef > 0`) → log, evaluate, checkpoint.

Prompts are drawn in a seeded order (a permutation per epoch, `prism.data.order.batch_indices`);
the number of batches drawn so far is saved with each checkpoint, and with the RNG states this
makes a resumed run continue exactly where the interrupted one would have gone.
Groups never split across processes: each process samples whole groups for its own prompts.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator

import torch

from prism.checkpoint import restore_optimizer, save_policy_checkpoint
from prism.core.config import load_config
from prism.core.errors import ConfigError, RunError
from prism.core.example import Example
from prism.core.rollouts import Rollouts, SamplingParams
from prism.core.task import load_task
from prism.data.formats import load_examples
from prism.data.loader import prompt_batches
from prism.dist import (
    ModelUpdate,
    optimizer_from_config,
    prepare,
    reduce_mean,
    replicated_load,
)
from prism.eval.policy import evaluate
from prism.loop.policy_update import policy_update
from prism.loop.run import (
    check_enough,
    claim_output_dir,
    close_run,
    end_step,
    load_eval_data,
    names_last_checkpoint,
    open_logs,
    setup_run,
    stage_processor,
)
from prism.losses.advantages import all_equal_groups, group_advantages
from prism.losses.policy import ALGORITHMS
from prism.models.loader import load_model
from prism.models.logprobs import token_log_probs
from prism.rewards import RewardModel, accuracy_reward, format_reward, overlong_penalty
from prism.rl.config import RLConfig
from prism.rollout.engine import RolloutBackend, make_backend

log = logging.getLogger("prism.rl")


def dynamic_sampling_on(cfg: RLConfig) -> bool:
    return cfg.algo.dynamic_sampling if cfg.algo.dynamic_sampling is not None else cfg.algo.name == "dapo"


def overlong_buffer(cfg: RLConfig) -> int:
    if cfg.algo.overlong_buffer is not None:
        return cfg.algo.overlong_buffer
    return cfg.rollout.max_new_tokens // 4 if cfg.algo.name == "dapo" else 0


def check_config(cfg: RLConfig) -> None:
    if cfg.rollout.group_size < 2:
        raise ConfigError(f"rollout.group_size: {cfg.rollout.group_size} with {cfg.algo.name}: group-relative "
                          "advantages of a group of one are always zero, so nothing would be learned; use >= 2")
    if overlong_buffer(cfg) >= cfg.rollout.max_new_tokens:
        raise ConfigError(f"algo.overlong_buffer: {overlong_buffer(cfg)} must be smaller than "
                          f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}")


def load_prompts(path: str, cfg: RLConfig) -> list[Example]:
    """RL problems: every example needs a ground-truth answer (its assistant turn, if any, is ignored)."""
    return load_examples(path, cfg.data.format, require_answer=True, skip_bad=cfg.data.skip_bad)


class BatchCollector:
    """Draws prompt batches in the run's seeded order, samples and scores them; dynamic sampling."""

    def __init__(self, cfg: RLConfig, accelerator, backend: RolloutBackend, prompts: list[Example],
                 rewards: RewardModel):
        self.cfg, self.acc, self.backend, self.prompts, self.rewards = cfg, accelerator, backend, prompts, rewards
        r = cfg.rollout
        self.params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                     top_k=r.top_k, n=r.group_size)
        self.cursor = 0  # global prompt batches drawn so far (saved in checkpoints)
        self._batches: Iterator[list[Example]] | None = None  # started at the first draw (after a resume)

    def _draw(self) -> tuple[Rollouts, torch.Tensor, dict[str, torch.Tensor], float]:
        """One batch of prompts, sampled and scored: rollouts, rewards [N], reward parts, scoring seconds."""
        cfg, acc = self.cfg, self.acc
        if self._batches is None:  # batch number `cursor` onwards, images decoded ahead by data.num_workers
            self._batches = prompt_batches(self.prompts, cfg.train.prompts_per_step, acc.num_processes,
                                           acc.process_index, cfg.train.seed, self.cursor, self.cursor + 10 ** 9,
                                           cfg.data.num_workers, cfg.data.prefetch)
        batch = next(self._batches)
        self.cursor += 1
        rollouts = self.backend.rollout(batch, self.params)
        expanded = [ex for ex in batch for _ in range(self.params.n)]
        t0 = time.perf_counter()
        rewards, parts = self.rewards(rollouts.texts, expanded)
        # accuracy and format are always monitored (RewardModel adds them; another scorer may not)
        for name, fn in (("accuracy", accuracy_reward), ("format", format_reward)):
            if name not in parts:
                values = fn(rollouts.texts, expanded, cfg.reward.answer_format)
                parts[name] = torch.tensor(values, dtype=torch.float32)
        shaping = overlong_penalty(rollouts.response_lengths, cfg.rollout.max_new_tokens, overlong_buffer(cfg),
                                   cfg.algo.overlong_penalty)
        parts["overlong_penalty"] = shaping
        return rollouts, rewards + shaping, parts, time.perf_counter() - t0

    def collect(self, step: int) -> tuple[Rollouts, torch.Tensor, dict[str, float]]:
        """Rollouts and rewards [N] for one step (N = kept groups × G), plus sampling metrics."""
        cfg, acc, G = self.cfg, self.acc, self.params.n
        want = cfg.train.prompts_per_step
        dynamic = dynamic_sampling_on(cfg)
        kept: list[Rollouts] = []
        kept_rewards: list[torch.Tensor] = []
        seen: dict[str, list[torch.Tensor]] = {}
        n_kept = dropped = rounds = 0
        t_gen = t_score = 0.0
        while True:
            t0 = time.perf_counter()
            rollouts, rewards, parts, seconds = self._draw()
            t_score += seconds
            t_gen += time.perf_counter() - t0
            rounds += 1
            for k, v in {**parts, "reward": rewards, "length": rollouts.response_lengths.float(),
                         "truncated": torch.tensor([f == "length" for f in rollouts.finish_reasons]).float()}.items():
                seen.setdefault(k, []).append(v)
            if dynamic:
                keep = ~all_equal_groups(parts["accuracy"] if cfg.algo.filter_metric == "accuracy" else rewards, G)
                dropped += int((~keep).sum())
                rows = torch.nonzero(keep.repeat_interleave(G)).squeeze(-1)
                rollouts, rewards = rollouts.select(rows), rewards[rows]
            kept.append(rollouts)
            kept_rewards.append(rewards)
            n_kept += len(rollouts) // G
            # Every process decides on the same (global minimum) count, so all stay in lockstep.
            have = -int(acc.reduce(torch.tensor(-n_kept, device=acc.device), "max"))  # min over processes
            if not dynamic or have >= want or rounds >= cfg.algo.max_num_gen_batches:
                break
        t_gen -= t_score
        if have == 0:
            raise RunError(
                f"step {step}: dynamic sampling dropped every group in {rounds} generation rounds "
                f"(algo.max_num_gen_batches={cfg.algo.max_num_gen_batches}): all {G} {cfg.algo.filter_metric} values of "
                "each prompt were equal — the problems are all solved or all failed by this policy. Filter the data to a "
                "difficulty band (prism-rl filter), raise algo.max_num_gen_batches, or set algo.dynamic_sampling=false")
        rollouts, rewards = Rollouts.concat(kept), torch.cat(kept_rewards)
        take = min(have, want) * G
        rollouts, rewards = rollouts.select(range(take)), rewards[:take]
        # nanmean: with reward.by_data_source, a component only some sources use is NaN on the others
        metrics = {f"rollout/{k}": float(torch.cat(v).nanmean()) for k, v in seen.items()}
        metrics.update({"rollout/dropped_groups": float(dropped), "rollout/gen_rounds": float(rounds),
                        "rollout/kept_groups": float(take // G),
                        "time/generation": t_gen, "time/scoring": t_score})
        return rollouts, rewards, metrics


def reference_log_probs(cfg: RLConfig, reference, rollouts: Rollouts) -> torch.Tensor | None:
    """[N, T] log-probs of the frozen reference (only with `algo.kl_coef > 0`), else None."""
    if reference is None:
        return None
    with torch.no_grad():
        return token_log_probs(reference, rollouts, cfg.rollout.temperature, cfg.rollout.logprob_chunk_size,
                               token_budget=cfg.rollout.logprob_token_budget)[0]


@names_last_checkpoint
def train(cfg: RLConfig) -> dict:
    check_config(cfg)
    # --- build -----------------------------------------------------------------------------
    accelerator, out = setup_run(cfg)
    task = load_task(cfg.data.task)
    processor = stage_processor(cfg)
    prompts = load_prompts(cfg.data.train, cfg)
    eval_data = load_eval_data(cfg)
    check_enough(cfg, len(prompts), cfg.train.prompts_per_step, "train.prompts_per_step", accelerator.num_processes)
    rewards = RewardModel(cfg.reward.functions, cfg.reward.answer_format, cfg.reward.by_data_source)

    resume_from = claim_output_dir(cfg, accelerator, out)
    model = load_model(cfg.model, trainable=True, device=accelerator.device, init_from=resume_from)
    reference = None
    if cfg.algo.kl_coef > 0:  # only then: a frozen copy of the starting policy
        with replicated_load():
            reference = load_model(cfg.model, trainable=False, device=accelerator.device).to(accelerator.device)
    optimizer, scheduler = optimizer_from_config(cfg, [p for p in model.parameters() if p.requires_grad])
    model, optimizer, params = prepare(accelerator, model, optimizer, cfg.algo.micro_batch_size)
    update = ModelUpdate(accelerator, model, optimizer, params, cfg.optim.max_grad_norm,
                         max_change=cfg.optim.max_param_change)
    backend = make_backend(cfg.rollout.backend, accelerator.unwrap_model(model), processor, cfg.rollout.chunk_size,
                           compile=cfg.rollout.compile, vllm=cfg.rollout.vllm,
                           model_path=cfg.model.path)
    collector = BatchCollector(cfg, accelerator, backend, prompts, rewards)

    start = 0
    if resume_from is not None:
        state = restore_optimizer(resume_from, optimizer, scheduler, accelerator.process_index, model=model,
                                  lr=cfg.optim.lr)
        start, collector.cursor = state["step"], state["cursor"]
    tracker, bar = open_logs(cfg, accelerator, out, start, f"rl/{cfg.algo.name}")
    metrics: dict[str, float] = {}

    # --- loop ------------------------------------------------------------------------------
    for step in range(start + 1, cfg.train.max_steps + 1):
        t0 = time.perf_counter()
        backend.sync_weights(accelerator.unwrap_model(model))
        rollouts, reward, metrics = collector.collect(step)
        advantages = group_advantages(reward, cfg.rollout.group_size, scale_by_std=cfg.algo.scale_rewards)

        t1 = time.perf_counter()
        actor = policy_update(update, rollouts, advantages, cfg.algo, temperature=cfg.rollout.temperature,
                              logprob_chunk_size=cfg.rollout.logprob_chunk_size,
                              logprob_token_budget=cfg.rollout.logprob_token_budget,
                              ref_log_probs=reference_log_probs(cfg, reference, rollouts), step=step)
        scheduler.step()
        metrics.update({f"rollout/{k}" if k.startswith("logprob_diff") else f"actor/{k}": v for k, v in actor.items()})
        metrics.update({"time/update": time.perf_counter() - t1, "time/step": time.perf_counter() - t0,
                        "actor/lr": scheduler.get_last_lr()[0]})
        metrics = reduce_mean(accelerator, metrics, ("rollout/",))

        end_step(cfg, step, metrics, tracker,
                 evaluate=(lambda: evaluate(accelerator, model, processor, eval_data, cfg.eval, task,
                                           cfg.reward.answer_format)) if eval_data else None,
                 save=lambda: save_policy_checkpoint(cfg, accelerator, step, model, processor, optimizer, scheduler,
                                                     {"metrics": metrics, "cursor": collector.cursor}))
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['rollout/reward']:.3f}", acc=f"{metrics.get('rollout/accuracy', 0):.3f}")

    close_run(accelerator, tracker, bar)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["filter"]:
        from prism.rl.filter import main as filter_main

        return filter_main(argv[1:])
    p = argparse.ArgumentParser(prog="prism-rl", description="Stage 3: RLVR with GRPO / DAPO / GSPO (docs/design.md §5). "
                                "`prism-rl filter --help` for the difficulty-matched subset.")
    p.add_argument("--algo", choices=sorted(ALGORITHMS), help="policy loss (overrides algo.name)")
    p.add_argument("--config", help="YAML config (see configs/rl/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.group_size=8 optim.lr=1e-6")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(RLConfig, a.config, a.overrides + ([f"algo.name={a.algo}"] if a.algo else []))
    metrics = train(cfg)
    if "eval/accuracy" in metrics:
        line = f"held-out ({cfg.data.eval}): greedy accuracy {metrics['eval/accuracy']:.3f}"
        if "eval_sampled/accuracy" in metrics:
            line += f" | sampled (T={cfg.rollout.temperature}) accuracy {metrics['eval_sampled/accuracy']:.3f}"
        print(line + f" | format validity {metrics['eval/format_rate']:.3f}")
    elif not metrics:
        print(f"nothing to do: {cfg.train.output_dir} already holds a checkpoint at train.max_steps={cfg.train.max_steps}")
    return metrics


if __name__ == "__main__":
    main()
