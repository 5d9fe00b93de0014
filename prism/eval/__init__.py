"""Layer 6 — evaluation: answer accuracy, format validity, the perception / reasoning error split
(with a task), drift from reference responses, held-out evaluation during training, and `prism-eval`."""
