"""Layer 8 — stage 1, SFT: next-token loss on the assistant tokens of demonstrations (`train`), and
its config (`config`)."""
