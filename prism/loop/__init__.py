"""Layer 7 — what the three stages' loops share, as functions (no trainer base class): run set-up and
the step tail of evaluate / log / save (`run`), and the clipped policy update that ALIGN and RL share
(`policy_update`)."""
