"""Stage 2 — ALIGN: black-box on-policy distillation against an MoE discriminator (DESIGN §4).

    from prism.align import MoEDiscriminator, discriminator_loss, alignment_advantages
"""

from prism.align.discriminator import DiscriminatorConfig, DiscriminatorOutput, MoEDiscriminator
from prism.align.losses import alignment_advantages, discriminator_loss

__all__ = ["DiscriminatorConfig", "DiscriminatorOutput", "MoEDiscriminator", "alignment_advantages",
           "discriminator_loss"]
