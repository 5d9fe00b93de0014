"""Layer 0 — core: what every other layer speaks. Errors (one line, naming the file or key), typed
configs and their loader, the `Example` type, the response format (docs/design.md §2), the typed
`Rollouts` and `SamplingParams`, the `Task` interface, and token-budget batching. Imports no other
prism package."""
