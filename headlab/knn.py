"""Weighted k-NN on L2-normalised features: the cheapest sanity check of a cache.

Cosine similarity to every training row, the top k vote with weights
``exp(similarity / T)`` (Wu et al. 2018; DINO's k-NN protocol, T = 0.07).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_probs(train_x: np.ndarray, train_y: np.ndarray, query_x: np.ndarray, *, ks: Sequence[int] = (10, 20, 50),
              temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024,
              chunk_bytes: int = 64 << 20) -> dict[int, np.ndarray]:
    """Class-probability estimates ``(Q, K)`` for each ``k`` in ``ks``.

    The training rows are not copied: cosine similarity is the dot product scaled by each
    row's inverse norm (as ``F.normalize``, norms clamped at 1e-12). Queries go in chunks
    of at most ``chunk`` rows, fewer where their ``(chunk, N)`` similarity matrix would
    exceed ``chunk_bytes``.
    """
    k_cls = int(num_classes or (int(train_y.max()) + 1))
    bank = torch.as_tensor(train_x, dtype=torch.float32)  # no copy for a float32 array
    inv_norm = torch.linalg.vector_norm(bank, dim=1).clamp_min_(1e-12).reciprocal_()
    labels = torch.as_tensor(train_y, dtype=torch.int64)
    kmax = min(max(ks), len(labels))
    chunk = int(max(1, min(chunk, chunk_bytes // (4 * max(len(labels), 1)))))
    out = {k: np.empty((len(query_x), k_cls), dtype=np.float64) for k in ks}
    for s in range(0, len(query_x), chunk):
        q = F.normalize(torch.as_tensor(query_x[s:s + chunk], dtype=torch.float32), dim=1)
        sim, idx = (q @ bank.T).mul_(inv_norm).topk(kmax, dim=1)  # sorted, most similar first
        w = (sim / temperature).exp()
        onehot = F.one_hot(labels[idx], k_cls).to(w.dtype)  # (q, kmax, K)
        for k in ks:
            kk = min(k, kmax)
            votes = (onehot[:, :kk] * w[:, :kk, None]).sum(1)
            out[k][s:s + len(q)] = (votes / votes.sum(1, keepdim=True)).double().numpy()
    return out
