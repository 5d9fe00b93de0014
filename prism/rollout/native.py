"""The native sampler (`rollout.backend: native`): one prefill per prompt, a static KV cache, and a decode
step that runs the decoder layers' own modules without transformers' per-step machinery.

    backend = NativeBackend(model, processor, chunk_size=64)
    rollouts = backend.rollout(examples, SamplingParams(n=8, temperature=1.0, max_new_tokens=256))

Per chunk of prompts (`chunk_size` sequences = prompts × n):

1. **Prefill once per prompt.** The model's own forward runs on the B distinct prompts (their images
   through the vision tower once), with a KV cache and logits for the last position only. Each row of
   that cache is then repeated for the prompt's n samples.
2. **Static KV cache.** Keys and values go into buffers allocated once for prompt + `max_new_tokens`
   positions. Every row advances one position per step (rows stay aligned: one write index for all).
   Finished rows stop costing work: when at most half of the rows are still running, the running
   ones are gathered into a smaller batch.
3. **Decode step** (`DecodeStep`): embeddings → for each decoder layer, its norms, projections (LoRA
   adapters included, they are the layers' own modules), q/k norms where the model has them, rotary
   embedding, attention over the cache (`scaled_dot_product_attention`, grouped-query), its MLP or MoE
   block → final norm → output head on the last position. On CUDA it can be `torch.compile`d with
   `mode="reduce-overhead"` (CUDA graphs), on a static attention length with batch sizes bucketed to
   powers of two (`rollout.compile`); elsewhere it runs eagerly, which is already most of the gain.
4. **Positions.** Qwen-VL's M-RoPE positions are computed once per prompt by the model's own
   `get_rope_index`; a generated token is text, so its three M-RoPE components are equal and its
   rotary embedding is the plain one at `last prompt position + 1 + t` — the position the
   teacher-forced forward (`prism.models.logprobs`) gives it.
5. **Sampling on device** (`sample_next`): temperature, top-k, top-p, vision placeholder ids never
   sampled, EOS stops a row. The recorded log-prob is that of the sampled token under
   softmax(logits / T) with the placeholders excluded (top-k / top-p truncation is not reflected, as
   in the HF backend); only [rows, V] logits of the current step exist at any time. Sampling draws from
   torch's global generator, whose state every checkpoint saves, so a resumed run samples the same.

Greedy outputs equal transformers' `generate` and the log-probs equal the teacher-forced forward to
float noise (tests/test_native.py, and per family tests/families). Supported: every family of
`prism.models.families`: the attention-only ones (decoder layers with `self_attn.{q,k,v,o}_proj`,
`input_layernorm`, `post_attention_layernorm`, `mlp`) through `DecodeStep`, the hybrid Gated-DeltaNet ones
(Qwen3.5) through `HybridDecodeStep`, which keeps each row's convolution and recurrent state in the cache. A
model whose weights are sharded (FSDP2, ZeRO-3) or of another structure is sampled by the HF backend instead,
with a warning (`make_backend`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from prism.core.batching import text_position_ids
from prism.core.example import Example
from prism.core.rollouts import Rollouts, SamplingParams, select_prompt_rows
from prism.data.collate import encode_prompts
from prism.models.families import family_of
from prism.models.loader import unwrap
from prism.rollout.ids import eos_ids, vision_ids

log = logging.getLogger("prism.rollout")


def supports_native(model: torch.nn.Module) -> str | None:
    """Why `model` cannot be sampled natively (None: it can)."""
    from prism.models.loader import is_fully_sharded

    if is_fully_sharded(model) or any(hasattr(p, "ds_id") for p in model.parameters()):
        return "its weights are sharded (FSDP2 / ZeRO-3)"
    base = unwrap(model)
    lm = getattr(getattr(base, "model", None), "language_model", None)
    if lm is None or not hasattr(lm, "layers") or not hasattr(base, "lm_head"):
        return f"{type(base).__name__} has no model.language_model.layers / lm_head"
    family = family_of(base)
    if family is not None and family.recurrent:
        if base.config._attn_implementation not in ("sdpa", "eager"):
            return (f"{family.name}'s decode step runs its attention layers' own forward, which takes a 4D mask "
                    f"under sdpa or eager, not {base.config._attn_implementation}")
        if not all(hasattr(layer, "linear_attn") or hasattr(layer, "self_attn") for layer in lm.layers):
            return f"{type(lm.layers[0]).__name__} is not a decoder layer the native sampler knows"
        return None
    layer = lm.layers[0]
    parts = ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp")
    if not all(hasattr(layer, p) for p in parts) or not all(
            hasattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")):
        return f"{type(layer).__name__} is not a decoder layer the native sampler knows"
    if not hasattr(getattr(lm, "rotary_emb", None), "inv_freq"):
        return "its rotary embedding has no inv_freq"
    if getattr(lm.config, "use_sliding_window", False):
        return "it uses sliding-window attention, which the native decode step does not implement"
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A plain nn.Linear as one op; anything else (a LoRA-wrapped layer, a quantised one) through its forward."""
    if type(module) is torch.nn.Linear:
        return F.linear(x, module.weight, module.bias)
    return module(x)


def _norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Qwen's RMSNorm (weight · x / rms(x), computed in float32) as one fused op where it is one."""
    eps = getattr(module, "variance_epsilon", None)
    weight = getattr(module, "weight", None)
    if eps is None or weight is None:
        return module(x)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def _mlp(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP (down(act(gate(x)) · up(x))) as three ops; an MoE block through its own forward."""
    if all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return _linear(module.down_proj, module.act_fn(_linear(module.gate_proj, x)) * _linear(module.up_proj, x))
    out = module(x)
    return out[0] if isinstance(out, tuple) else out  # some MoE blocks also return router logits


class DecodeStep(torch.nn.Module):
    """One decoding position for every row: logits [n, V] of the next token, the cache updated in place.

    forward(tokens [n] long, positions [n] long, slot [] long, keys/values: per layer [n, Hkv, S, D],
    mask [n, S] bool (True: attend)) -> [n, V] logits. `slot` is the cache position written this step.
    The layers' own modules compute; plain linear layers and RMSNorms go through one functional op each
    (fewer Python calls per step), the rest (LoRA, MoE) through their forward.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        base = unwrap(model)
        self.lm = base.model.language_model
        self.head = base.lm_head
        cfg = self.lm.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = float(getattr(self.lm.rotary_emb, "attention_scaling", 1.0))

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, 1, 1, D] of text tokens at `positions` (all M-RoPE components equal)."""
        inv_freq = self.lm.rotary_emb.inv_freq.float()
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return ((emb.cos() * self.scaling).to(dtype)[:, None, None, :],
                (emb.sin() * self.scaling).to(dtype)[:, None, None, :])

    def forward(self, tokens, positions, slot, keys, values, mask):
        n = tokens.shape[0]
        h = self.lm.embed_tokens(tokens)[:, None, :]
        cos, sin = self.rotary(positions, h.dtype)
        attend = mask[:, None, None, :]  # [n, 1, 1, S]
        group = self.num_heads // self.num_kv
        for i, layer in enumerate(self.lm.layers):
            a = layer.self_attn
            x = _norm(layer.input_layernorm, h)
            q = _linear(a.q_proj, x).view(n, 1, self.num_heads, self.head_dim)
            k = _linear(a.k_proj, x).view(n, 1, self.num_kv, self.head_dim)
            v = _linear(a.v_proj, x).view(n, 1, self.num_kv, self.head_dim)
            if hasattr(a, "q_norm"):  # Qwen3: RMSNorm per head before the rotary embedding
                q, k = _norm(a.q_norm, q), _norm(a.k_norm, k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [n, H, 1, D]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys[i].index_copy_(2, slot.view(1), k)
            values[i].index_copy_(2, slot.view(1), v)
            # one query per row: two batched matmuls, each key/value head shared by its group of query heads
            qg = q.reshape(n, self.num_kv, group, self.head_dim)
            scores = torch.matmul(qg, keys[i].transpose(-1, -2)).float() * a.scaling  # [n, Hkv, g, S]
            probs = torch.softmax(scores.masked_fill(~attend, float("-inf")), dim=-1).to(v.dtype)
            o = torch.matmul(probs, values[i]).reshape(n, 1, self.num_heads * self.head_dim)
            h = h + _linear(a.o_proj, o)
            h = h + _mlp(layer.mlp, _norm(layer.post_attention_layernorm, h))
        return _linear(self.head, _norm(self.lm.norm, h)[:, -1])


class _RowState:
    """One decoding position's cache, as the layers' own forwards read one (`transformers.Cache`'s calls they
    make): an attention layer's keys and values go into its static buffers at `slot` and it attends over the
    first `length` positions; a Gated-DeltaNet layer reads and updates its convolution and recurrent states in
    place."""

    def __init__(self, keys, values, conv, recurrent, slot, length):
        self.keys, self.values, self.conv, self.recurrent = keys, values, conv, recurrent
        self.slot, self.length = slot, length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.slot.view(1), key_states)
        self.values[layer_idx].index_copy_(2, self.slot.view(1), value_states)
        return self.keys[layer_idx][:, :, :self.length], self.values[layer_idx][:, :, :self.length]

    def get_conv_state(self, layer_idx, state_idx=0):
        return self.conv[layer_idx]

    def get_recurrent_state(self, layer_idx, state_idx=0):
        return self.recurrent[layer_idx]

    def update_recurrent_state(self, state, layer_idx, state_idx=0, **kwargs):
        self.recurrent[layer_idx].copy_(state)
        return self.recurrent[layer_idx]

    def is_recording_past(self, layer_idx=None):
        return False

    def increase_count(self, layer_idx, state_idx=0):
        """(A cache counts decoded tokens here; positions come from the caller.)"""

    def get_recurrent_states_to_keep(self, layer_idx=None):
        return 0


class HybridDecodeStep(torch.nn.Module):
    """`DecodeStep` for the hybrid Gated-DeltaNet + attention families (Qwen3.5, dense and MoE): each decoder
    layer runs its own forward on one position per row, with a `_RowState` for a cache. Attention layers write
    their keys and values into the static buffers and attend under an additive mask (gated queries, partial
    rotary and zero-centred norms are theirs); Gated-DeltaNet layers advance each row's convolution window and
    recurrent state in place (`keys[i]` / `values[i]` are None for them, `conv[i]` / `recurrent[i]` None for
    attention layers).

    forward(tokens [n], positions [n], slot [], keys/values: per attention layer [n, Hkv, S, D], mask [n, S]
    bool, conv: per linear layer [n, C, K], recurrent: [n, Hv, Dk, Dv]) -> [n, V] logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        base = unwrap(model)
        self.lm = base.model.language_model
        self.head = base.lm_head

    def forward(self, tokens, positions, slot, keys, values, mask, conv, recurrent):
        h = self.lm.embed_tokens(tokens)[:, None, :]
        # text tokens: the three M-RoPE components equal, through the model's own rotary embedding
        cos_sin = self.lm.rotary_emb(h, positions[None, :, None].expand(3, -1, 1))
        additive = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill(~mask, float("-inf"))
        state = _RowState(keys, values, conv, recurrent, slot, mask.shape[1])
        for layer in self.lm.layers:
            linear = hasattr(layer, "linear_attn")
            h = layer(h, position_embeddings=cos_sin, attention_mask=None if linear else additive[:, None, None, :],
                      position_ids=None, cache=state)
        return _linear(self.head, self.lm.norm(h)[:, -1])


def sample_next(logits: torch.Tensor, params: SamplingParams, suppress: torch.Tensor | None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row and its log-prob.

    logits: [n, V]; suppress: ids never sampled. Greedy (temperature 0): the argmax. Otherwise a sample
    of softmax(logits / T) truncated to the top-k ids and to the top-p nucleus (the smallest set of
    most probable ids whose probability reaches top_p; at least one). Returns (tokens [n] long,
    log-probs [n] float32 of the tokens under softmax(logits / T) over the non-suppressed ids; T = 1 when
    greedy)."""
    logits = logits.float()
    if suppress is not None and len(suppress):
        logits = logits.index_fill(-1, suppress, float("-inf"))
    greedy = params.temperature <= 0
    scaled = logits if greedy else logits / params.temperature
    log_probs = torch.log_softmax(scaled, dim=-1)
    if greedy:
        tokens = scaled.argmax(-1)
    else:
        filtered = scaled
        if params.top_k and params.top_k < filtered.shape[-1]:
            kth = torch.topk(filtered, params.top_k, dim=-1).values[:, -1:]
            filtered = filtered.masked_fill(filtered < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(filtered, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            before = probs.cumsum(-1) - probs  # probability of the ids ranked above each id
            drop_sorted = before >= params.top_p
            drop_sorted[:, 0] = False
            filtered = filtered.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        # inverse CDF: the first id whose cumulative probability exceeds u ~ U[0, total) — ids of probability 0
        # (suppressed, outside top-k / top-p) are never picked; one uniform per row
        cdf = torch.softmax(filtered, dim=-1).cumsum(-1)
        u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    return tokens, log_probs.gather(-1, tokens[:, None]).squeeze(-1)


def _static(buffers: list[torch.Tensor | None]) -> None:
    """Mark the cache buffers as fixed addresses: the CUDA graph writes into them in place."""
    for buf in buffers:
        if buf is not None:
            torch._dynamo.mark_static_address(buf)


def _bucket(n: int) -> int:
    return 1 << (n - 1).bit_length()


class NativeBackend:
    """The native sampler (module docstring) behind the `RolloutBackend` protocol."""

    def __init__(self, model: torch.nn.Module, processor, chunk_size: int = 64, compile: bool = False):
        self.processor, self.chunk_size, self.compile = processor, chunk_size, compile
        self.sync_weights(model)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """The step runs the model's own modules: the same weights, nothing to copy. A new model object
        (e.g. another policy) gets its own step."""
        if getattr(self, "model", None) is not model:
            self.model = model
            family = family_of(model)
            self.hybrid = family is not None and family.recurrent
            self.step = HybridDecodeStep(model) if self.hybrid else DecodeStep(model)
            self._compiled = None

    # ------------------------------------------------------------------------------ ids and positions

    def _vision_ids(self) -> list[int]:
        return vision_ids(self.model)

    def _eos_ids(self) -> list[int]:
        return eos_ids(self.model, self.processor)

    def _next_positions(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B] the position of each prompt's first generated token: its last M-RoPE position + 1."""
        mask = inputs["attention_mask"].bool()
        inner = getattr(unwrap(self.model), "model", None)
        if "image_grid_thw" in inputs and hasattr(inner, "get_rope_index"):
            names = inspect.signature(inner.get_rope_index).parameters
            positions, _ = inner.get_rope_index(**{k: inputs.get(k) for k in names if k in inputs})
            last = positions.masked_fill(~mask[None], -1).amax(dim=(0, 2))
        else:
            last = text_position_ids(inputs["attention_mask"]).masked_fill(~mask, -1).amax(-1)
        return last + 1

    def _prefill(self, inputs: dict[str, torch.Tensor]):
        """The model's own forward over the prompts: logits [B, V] of the next token and, per layer, its (k, v)
        [B, Hkv, P, D] or, for a Gated-DeltaNet layer (`linear_attn`), its (conv [B, C, K], recurrent
        [B, Hv, Dk, Dv]) state."""
        base = unwrap(self.model)
        extra = {}
        if "pixel_values" not in inputs:  # as the HF backend and the log-prob forward number text-only rows
            extra["position_ids"] = text_position_ids(inputs["attention_mask"])
        out = base(**inputs, **extra, use_cache=True, logits_to_keep=1)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        if hasattr(cache, "layers"):
            kv = [(layer.conv_states[0], layer.recurrent_states[0]) if hasattr(layer, "recurrent_states")
                  else (layer.keys, layer.values) for layer in cache.layers]
        else:  # older transformers
            kv = list(zip(cache.key_cache, cache.value_cache))
        return out["logits"][:, -1], kv

    # ------------------------------------------------------------------------------ sampling

    def _compiled_step(self):
        """The decode step under torch.compile (CUDA: CUDA graphs), built once; None where compiling is off
        or failed (with a warning: the eager step is used)."""
        if not self.compile:
            return None
        if self._compiled is None:
            cuda = next(self.model.parameters()).device.type == "cuda"
            try:
                self._compiled = torch.compile(self.step, mode="reduce-overhead" if cuda else None, dynamic=True)
            except Exception as e:  # noqa: BLE001 - no compiler for this platform: sample eagerly
                log.warning("rollout.compile: torch.compile is unavailable (%s); decoding eagerly", e)
                self.compile = False
                return None
        return self._compiled

    @torch.no_grad()
    def rollout(self, examples: Sequence[Example], params: SamplingParams) -> Rollouts:
        model = self.model
        was_training = model.training
        model.eval()
        try:
            eos, suppress = self._eos_ids(), self._vision_ids()
            per_chunk = max(1, self.chunk_size // params.n)
            parts = [self._chunk(list(examples[i: i + per_chunk]), params, eos, suppress)
                     for i in range(0, len(examples), per_chunk)]
        finally:
            model.train(was_training)
        return Rollouts.concat(parts)

    def _chunk(self, chunk: list[Example], params: SamplingParams, eos: list[int], suppress: list[int]) -> Rollouts:
        """Sample `params.n` responses for each prompt of `chunk` (module docstring, 1–5)."""
        tok = self.processor.tokenizer
        device = next(self.model.parameters()).device
        prompt = encode_prompts(self.processor, chunk)
        inputs = {k: v.to(device) for k, v in prompt.items()}
        G, T = params.n, params.max_new_tokens
        with torch.compiler.set_stance("force_eager"):  # one shape per chunk: not worth compiling
            first_logits, kv = self._prefill(inputs)
        B, P = inputs["input_ids"].shape
        N, S = B * G, P + T
        compiled = self._compiled_step()
        # Rows held: the N samples (compiled: a power of two, the extra rows copies of row 0 whose outputs are
        # never read). State per held row: its cache, mask, position and next input token.
        held = _bucket(N) if compiled is not None else N
        pick = torch.arange(held, device=device) // G  # the prompt of each held row
        pick = pick.masked_fill(pick >= B, 0)
        # per layer: attention layers' key / value buffers, Gated-DeltaNet layers' conv / recurrent states (the
        # other pair None); every tensor is per held row
        recurrent_layer = [hasattr(layer, "linear_attn") for layer in self.step.lm.layers]
        keys, values, conv, recurrent = [], [], [], []
        for (a, b), rec in zip(kv, recurrent_layer):
            if rec:
                keys.append(None), values.append(None), conv.append(a[pick]), recurrent.append(b[pick])
                continue
            k = torch.zeros(held, a.shape[1], S, a.shape[3], dtype=a.dtype, device=device)
            v = torch.zeros(held, b.shape[1], S, b.shape[3], dtype=b.dtype, device=device)
            k[:, :, :P], v[:, :, :P] = a[pick], b[pick]
            keys.append(k), values.append(v), conv.append(None), recurrent.append(None)
        del kv
        if compiled is not None and device.type == "cuda":
            _static(keys + values + conv + recurrent)
        mask = torch.zeros(held, S, dtype=torch.bool, device=device)
        mask[:, :P] = inputs["attention_mask"].bool()[pick]
        positions = self._next_positions(inputs)[pick]
        logits = first_logits[pick]
        suppress_t = torch.tensor(suppress, dtype=torch.long, device=device)
        eos_t = torch.tensor(eos, dtype=torch.long, device=device)

        out_tokens = torch.full((N, T), tok.pad_token_id, dtype=torch.long, device=device)
        out_lp = torch.zeros(N, T, dtype=torch.float32, device=device)
        live = torch.arange(N, device=device)  # the sample of each of the first len(live) held rows
        running = torch.ones(N, dtype=torch.bool, device=device)  # per live row: no EOS sampled yet
        steps = 0
        for t in range(T):
            m = len(live)
            tokens, lp = sample_next(logits[:m], params, suppress_t)
            out_tokens[live, t] = tokens  # (a finished row's later tokens are cut below: after its EOS)
            out_lp[live, t] = lp
            steps = t + 1
            running &= ~torch.isin(tokens, eos_t)
            if t == T - 1 or not bool(running.any()):
                break
            n_run = int(running.sum())
            if n_run <= held // 2:  # finished rows stop costing work: gather the running ones
                keep = running.nonzero().squeeze(-1)
                held = _bucket(n_run) if compiled is not None else n_run
                idx = torch.cat([keep, keep[:1].expand(held - n_run)])
                live, tokens, running = live[keep], tokens[keep], running[keep]
                keys, values, conv, recurrent = ([None if x is None else x[idx] for x in xs]
                                                 for xs in (keys, values, conv, recurrent))
                mask, positions = mask[idx], positions[idx]
                if compiled is not None and device.type == "cuda":
                    _static(keys + values + conv + recurrent)
            if held > len(tokens):  # the held rows past the live ones read any token
                tokens = torch.cat([tokens, tokens[:1].expand(held - len(tokens))])
            slot = P + t
            mask[:, slot] = True
            states = (conv, recurrent) if self.hybrid else ()
            if compiled is not None:  # static shapes: the whole cache, masked
                try:
                    logits = compiled(tokens, positions + t, torch.tensor(slot, device=device), keys, values, mask,
                                      *states)
                except Exception as e:  # noqa: BLE001 - compiling failed on first use: this chunk again, eagerly
                    log.warning("rollout.compile: the compiled decode step failed (%s); decoding eagerly",
                                str(e).splitlines()[0] if str(e) else type(e).__name__)
                    self.compile, self._compiled = False, None
                    return self._chunk(chunk, params, eos, suppress)
            else:  # eager: only the positions written so far
                seen = slot + 1
                logits = self.step(tokens, positions + t, torch.tensor(slot, device=device),
                                   [k if k is None else k[:, :, :seen] for k in keys],
                                   [v if v is None else v[:, :, :seen] for v in values], mask[:, :seen], *states)
        response = out_tokens[:, :steps].cpu()
        is_eos = torch.isin(response, eos_t.cpu())
        valid = ~((is_eos.cumsum(-1) - is_eos.long()) > 0)  # up to and including the first EOS
        response = response.masked_fill(~valid, tok.pad_token_id)
        repeat = torch.arange(B).repeat_interleave(G)
        images = torch.tensor([len(ex.images) for ex in chunk])
        return Rollouts(
            prompt=select_prompt_rows(prompt, images, repeat),
            images_per_row=images[repeat],
            response_ids=response,
            response_mask=valid,
            log_probs=out_lp[:, :steps].cpu().masked_fill(~valid, 0.0),
            texts=tok.batch_decode(response, skip_special_tokens=True),
            finish_reasons=["stop" if f else "length" for f in is_eos.any(-1).tolist()],
            suppress_ids=torch.tensor(suppress, dtype=torch.long),
            pad_token_id=tok.pad_token_id,
            group_size=G,
        )
