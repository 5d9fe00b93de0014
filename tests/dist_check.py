"""Run one RL policy update and one ALIGN discriminator update on fixed rollouts, in 1 or N processes.

    python tests/dist_check.py MODEL_DIR DATA_DIR OUT_FILE
    accelerate launch --config_file configs/accelerate/ddp_cpu.yaml tests/dist_check.py MODEL_DIR DATA_DIR OUT_FILE
    (or zero2_cpu.yaml, fsdp2_cpu.yaml)

Every process samples the same rollouts for the same prompts (same seed), then keeps its share of the
prompt groups, as the trainers do. With the losses normalised by global token / sequence counts, the
updates (two PPO epochs over one mini-batch in micro-batches of 2 rows; one discriminator step) and
so the updated weights must not depend on the number of processes; test_distributed.py compares them.
(With several mini-batches they would: each process shuffles its own groups into them.)
"""

from __future__ import annotations

import sys

import torch

from prism.align.discriminator import MoEDiscriminator
from prism.align.config import AlignConfig
from prism.align.game import discriminator_player, discriminator_update
from prism.core.config import ModelSettings, load_config
from prism.data.formats import load_examples
from prism.dist import ModelUpdate, make_accelerator, prepare
from prism.models.loader import load_model
from prism.models.processor import load_processor
from prism.loop.policy_update import policy_update
from prism.rollout.engine import SamplingParams, sample

B, G = 4, 3


def main(model_dir: str, data_dir: str, out_file: str) -> None:
    torch.set_num_threads(1)
    acc = make_accelerator()
    rank, world = acc.process_index, acc.num_processes
    cfg = load_config(AlignConfig, None, [f"rollout.group_size={G}", "algo.micro_batch_size=2", "algo.mini_batches=1",
                                          "algo.ppo_epochs=2", "discriminator.prompts_per_micro_batch=1"])
    processor = load_processor(model_dir)
    prompts = load_examples(f"{data_dir}/align.jsonl", limit=B)
    torch.manual_seed(0)
    model = load_model(ModelSettings(path=model_dir, freeze_vision=False, freeze_merger=False), trainable=True)
    rollouts = sample(model, processor, prompts, SamplingParams(n=G, temperature=1.0, max_new_tokens=8))
    rewards = torch.tensor([float(len(t) % 5) for t in rollouts.texts])
    advantages = rewards - rewards.view(-1, G).mean(1).repeat_interleave(G)
    share = B // world
    mine = list(range(rank * share * G, (rank + 1) * share * G))

    # --- the policy update (DDP-wrapped policy, as in prism-rl / prism-align)
    params = [p for p in model.parameters() if p.requires_grad]
    # plain SGD: the update is the (clipped) gradient itself. Clipping at 1.0 is also what the DeepSpeed
    # config of configs/accelerate/zero2_cpu.yaml does inside its engine.
    optimizer = torch.optim.SGD(params, lr=0.5)
    model, optimizer, params = prepare(acc, model, optimizer, 2)
    torch.manual_seed(1)  # the mini-batch shuffle
    update = ModelUpdate(acc, model, optimizer, params, max_grad_norm=1.0)
    metrics = policy_update(update, rollouts.select(mine), advantages[mine], cfg.algo, temperature=1.0,
                            logprob_chunk_size=2)

    # --- the discriminator update (not DDP-wrapped: gradients summed by ModelUpdate(replicated=True))
    torch.manual_seed(2)
    disc = MoEDiscriminator.from_pretrained(model_dir)
    cfg.discriminator.max_grad_norm = None
    d_update = discriminator_player(cfg, acc, disc)
    d_update.optimizer = torch.optim.SGD(disc.trainable_parameters(), lr=0.5)
    valid = torch.tensor([True] * (B * G))
    valid[1] = False  # an invalid rollout is left out of the discriminator loss
    batch = prompts[rank * share:(rank + 1) * share]
    d_metrics = discriminator_update(disc, d_update, cfg, batch, [rollouts.texts[i] for i in mine], valid[mine])

    full = acc.get_state_dict(model)  # a collective under FSDP2, which shards the weights themselves
    if rank == 0:
        policy = {k: v.detach().clone() for k, v in full.items()}
        heads = {k: v.detach().clone() for k, v in disc.state_dict().items() if "lora_" in k or "heads." in k}
        torch.save({"policy": policy, "disc": heads, "loss": metrics["loss"], "d_loss": d_metrics.get("loss"),
                    "distributed_type": str(acc.distributed_type), "processes": world}, out_file)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:4])
