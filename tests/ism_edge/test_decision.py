"""The host half of the chain (ism_edge.decision): verdicts and the feedback rule on fixed arrays."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from ism_edge import scores
from ism_edge.backends import ChainOutput
from ism_edge.decision import decide, feedback_reformation
from ism_edge.manifest import SCORE_NAMES, EngineManifest
from tests.ism_edge import fake_tensorrt as fake

N, K = 64, 10


@pytest.fixture
def chain() -> ChainOutput:
    rng = np.random.default_rng(0)
    raw = (3 * rng.standard_normal((N, K))).astype(np.float32)
    reformed = (raw + rng.standard_normal((N, K)) * rng.uniform(0, 3, (N, 1))).astype(np.float32)
    return ChainOutput(
        recon_error=rng.uniform(0, 0.1, N).astype(np.float32), logits_raw=raw, logits_reformed=reformed,
        p_score=rng.uniform(0, 1, N).astype(np.float32), rounds=np.zeros(N, dtype=np.int32),
    )


def _manifest(tmp_path: Path, label_source: str) -> EngineManifest:
    m = fake.engine_directory(tmp_path)
    return dataclasses.replace(m, label_source=label_source,
                               thresholds={"recon_error": 0.07, "jsd": 0.05, "p_score": 0.8},
                               temperatures={"deploy": 2.0, "detector": 10.0},
                               class_names=tuple(f"c{i}" for i in range(K)))


@pytest.mark.parametrize("label_source", ["auto", "reformed"])
def test_decide_gives_the_verdicts_of_the_chain_rules(chain: ChainOutput, tmp_path: Path, label_source: str) -> None:
    """Flags and labels as docs/architecture.md ("The defense chain") states them (the formulas the
    parity gate used to copy)."""
    m = _manifest(tmp_path, label_source)
    d = decide(chain, m)
    jsd = scores.jsd(chain.logits_raw, chain.logits_reformed, 10.0)
    want_flags = {"recon_error": chain.recon_error > 0.07, "jsd": jsd > 0.05, "p_score": chain.p_score > 0.8}
    flagged = want_flags["recon_error"] | want_flags["jsd"] | want_flags["p_score"]
    logits = (np.where(flagged[:, None], chain.logits_reformed, chain.logits_raw) if label_source == "auto"
              else chain.logits_reformed)
    assert 0 < flagged.sum() < N  # both kinds of sample are decided
    for s in SCORE_NAMES:
        np.testing.assert_array_equal(d.detector_flags[s], want_flags[s], err_msg=s)
    np.testing.assert_array_equal(d.flags, flagged)
    np.testing.assert_array_equal(d.labels, logits.argmax(axis=1))
    np.testing.assert_allclose(d.probs, scores.softmax(logits, 2.0))
    np.testing.assert_allclose(d.scores["jsd"], jsd)


def _toy_map(v: np.ndarray) -> np.ndarray:
    return 0.5 * v + 0.25  # contracts towards 0.5: the residual halves every round


def _residual(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b).reshape(len(a), -1).mean(axis=1).astype(np.float32)


def _whole_batch_reform(x_hat: np.ndarray, rounds: int, threshold: float) -> np.ndarray:
    """``ism_edge_training.defense.Defense.reform``'s loop in numpy: re-map the whole batch every round."""
    for _ in range(rounds):
        again = _toy_map(x_hat)
        still = _residual(x_hat, again) > threshold
        if not still.any():
            break
        x_hat = np.where(still[:, None, None, None], again, x_hat)
    return x_hat


@pytest.mark.parametrize("rounds", [0, 1, 3, 20])
def test_feedback_reformation_equals_re_mapping_the_whole_batch(rounds: int) -> None:
    rng = np.random.default_rng(1)
    # distances from the fixed point 0.5 spread over 3.5 decades: from 0 to ~9 rounds each
    start = (0.5 + 10 ** rng.uniform(-2.5, 1, (12, 1, 1, 1)) * np.ones((1, 1, 2, 2))).astype(np.float32)
    x_hat = start.copy()
    calls: list[np.ndarray] = []
    held: list[np.ndarray] = []

    def remap(active: np.ndarray) -> np.ndarray:
        calls.append(active)
        held[:] = [_toy_map(x_hat[active])]
        return _residual(x_hat[active], held[0])

    def replace(rows: np.ndarray, still: np.ndarray) -> None:
        x_hat[rows] = held[0][still]

    counts = feedback_reformation(rounds, 0.01, len(x_hat), remap, replace)
    np.testing.assert_allclose(x_hat, _whole_batch_reform(start, rounds, 0.01))
    assert counts.dtype == np.int32 and counts.max() <= rounds
    for i, c in enumerate(counts):  # a sample's count is the number of replacements it went through
        np.testing.assert_allclose(x_hat[i], _whole_batch_reform(start[i : i + 1], c, 0.0)[0], rtol=1e-6)
    assert len(calls) <= rounds and all(np.all(np.diff(a) > 0) for a in calls)
    if rounds == 20:
        # stopped early; samples converged at different rounds
        assert len(calls) < rounds and len(set(counts.tolist())) > 2
