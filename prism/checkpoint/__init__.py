"""Layer 6 — checkpoints: atomic saves (`atomic`: write to a temporary directory, rename into place)
and the policy checkpoint every stage writes and resumes from exactly (`policy`)."""

from prism.checkpoint.atomic import (
                                     STATE_FILE,
                                     checkpoint_dir,
                                     checkpoint_problem,
                                     checkpoint_step,
                                     find_resume,
                                     list_checkpoints,
                                     load_trainer_state,
                                     resolve_resume,
                                     save_checkpoint,
                                     set_aside,
)
from prism.checkpoint.policy import restore_optimizer, save_policy_checkpoint

__all__ = ["STATE_FILE", "checkpoint_dir", "checkpoint_problem", "checkpoint_step", "find_resume", "list_checkpoints",
           "load_trainer_state", "resolve_resume", "restore_optimizer", "save_checkpoint", "save_policy_checkpoint",
           "set_aside"]
