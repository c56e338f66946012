"""Detector scores computed on the host (numpy): softmax and Jensen–Shannon divergence.

The same formulas are used by ``ism_edge_training.defense`` in PyTorch, so PyTorch, ONNX Runtime and
TensorRT give the same verdicts (docs/architecture.md, "The defense chain").
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-12


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64 for stability."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def jsd(logits_a: np.ndarray, logits_b: np.ndarray, temperature: float) -> np.ndarray:
    """Jensen–Shannon divergence (natural log) between softmax(a/T) and softmax(b/T), per row.

    MagNet's probability-divergence detector (Meng & Chen 2017) with ``b`` = C(M(x)).
    """
    p = softmax(logits_a, temperature)
    q = softmax(logits_b, temperature)
    m = 0.5 * (p + q)
    kl_pm = np.sum(p * (np.log(p + _EPS) - np.log(m + _EPS)), axis=-1)
    kl_qm = np.sum(q * (np.log(q + _EPS) - np.log(m + _EPS)), axis=-1)
    return (0.5 * (kl_pm + kl_qm)).astype(np.float32)
