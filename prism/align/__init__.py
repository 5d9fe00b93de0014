"""Layer 8 — stage 2, ALIGN: black-box on-policy distillation against an MoE discriminator
(docs/design.md §4): the discriminator, its pure losses, the game, the warm-start, the loop.

    from prism.align import MoEDiscriminator, discriminator_loss, alignment_advantages
"""

from prism.align.discriminator import DiscriminatorConfig, DiscriminatorOutput, MoEDiscriminator
from prism.align.losses import alignment_advantages, discriminator_loss

__all__ = ["DiscriminatorConfig", "DiscriminatorOutput", "MoEDiscriminator", "alignment_advantages",
           "discriminator_loss"]
