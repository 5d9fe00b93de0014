"""Stage 3 — RLVR (GRPO / DAPO / GSPO) and the clipped policy update shared with ALIGN."""
