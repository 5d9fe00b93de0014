"""Drift of a model's sampled responses from a reference set (the curated teacher references).

The paper could only report structural proxies; here three distances, each 0 for a set against
itself and growing with a shift:

- `length_distance`: per section (caption / think / answer), the 1-D Wasserstein distance between
  the token-length distributions (in tokens);
- `token_divergence`: per section, the Jensen–Shannon divergence (base 2, in [0, 1]) between the
  unigram token distributions;
- `embedding_mmd`: the squared maximum mean discrepancy (RBF kernel, median-heuristic bandwidth,
  unbiased estimate) between mean-pooled last hidden states of one fixed model.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import wasserstein_distance

from prism.core.batching import text_position_ids
from prism.core.response import SECTIONS, parse_response


def _sections(texts: Sequence[str]) -> dict[str, list[str]]:
    parsed = [parse_response(t) for t in texts]
    return {s: [getattr(p, s) or "" for p in parsed] for s in SECTIONS}


def length_distance(tokenizer, texts: Sequence[str], reference: Sequence[str]) -> dict[str, float]:
    """Per-section 1-D Wasserstein distance between token-length distributions (missing section: 0 tokens)."""
    a, b = _sections(texts), _sections(reference)
    out = {}
    for s in SECTIONS:
        la = [len(tokenizer(x, add_special_tokens=False)["input_ids"]) for x in a[s]]
        lb = [len(tokenizer(x, add_special_tokens=False)["input_ids"]) for x in b[s]]
        out[s] = float(wasserstein_distance(la, lb))
    return out


def token_divergence(tokenizer, texts: Sequence[str], reference: Sequence[str]) -> dict[str, float]:
    """Per-section Jensen–Shannon divergence (base 2) between unigram token distributions."""
    a, b = _sections(texts), _sections(reference)
    out = {}
    for s in SECTIONS:
        ca = Counter(t for x in a[s] for t in tokenizer(x, add_special_tokens=False)["input_ids"])
        cb = Counter(t for x in b[s] for t in tokenizer(x, add_special_tokens=False)["input_ids"])
        vocab = sorted(set(ca) | set(cb))
        if not vocab or not ca or not cb:
            out[s] = 0.0 if not ca and not cb else 1.0  # both empty: no drift; one empty: maximal
            continue
        pa = np.array([ca[v] for v in vocab], dtype=float)
        pb = np.array([cb[v] for v in vocab], dtype=float)
        out[s] = float(jensenshannon(pa / pa.sum(), pb / pb.sum(), base=2) ** 2)
    return out


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> float:
    """Unbiased MMD² between samples x [n, d] and y [m, d] with an RBF kernel exp(−‖a−b‖² / (2σ²)).

    σ defaults to the median pairwise distance of the pooled samples (the median heuristic).
    """
    x, y = x.double(), y.double()
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).pow(2)
    if bandwidth is None:
        off = d2[~torch.eye(len(z), dtype=torch.bool)]
        bandwidth = float(off.median().sqrt()) if off.numel() else 1.0
        bandwidth = bandwidth or 1.0
    k = torch.exp(-d2 / (2 * bandwidth ** 2))
    n, m = len(x), len(y)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    term_x = (kxx.sum() - kxx.diagonal().sum()) / max(n * (n - 1), 1)
    term_y = (kyy.sum() - kyy.diagonal().sum()) / max(m * (m - 1), 1)
    return float(term_x + term_y - 2 * kxy.mean())


@torch.no_grad()
def mean_pooled_embeddings(model, tokenizer, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """[N, H] mean over tokens of the last hidden state of `model`'s language model (text only)."""
    device = next(model.parameters()).device
    body = model.model if hasattr(model, "model") else model
    out = []
    tokenizer.padding_side = "right"
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i: i + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False)
        mask = enc["attention_mask"].to(device)
        h = body(input_ids=enc["input_ids"].to(device), attention_mask=mask,
                 position_ids=text_position_ids(mask), use_cache=False).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        out.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def drift_metrics(tokenizer, texts: Sequence[str], reference: Sequence[str], embed_model=None) -> dict[str, float]:
    """All drift distances of `texts` from `reference`, flat: length/<section>, tokens/<section>, embedding_mmd."""
    out = {f"length/{k}": v for k, v in length_distance(tokenizer, texts, reference).items()}
    out.update({f"tokens/{k}": v for k, v in token_divergence(tokenizer, texts, reference).items()})
    if embed_model is not None and len(texts) > 1 and len(reference) > 1:
        ex = mean_pooled_embeddings(embed_model, tokenizer, texts)
        ey = mean_pooled_embeddings(embed_model, tokenizer, reference)
        out["embedding_mmd"] = mmd2(ex, ey)
    return out
