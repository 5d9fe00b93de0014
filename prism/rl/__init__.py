"""Layer 8 — stage 3, RLVR with GRPO / DAPO / GSPO and verifiable rewards (`train`), its config
(`config`) and the difficulty-matched subset (`filter`, `prism-rl filter`)."""
