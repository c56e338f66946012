"""DefenseRuntime on ONNX Runtime: same verdicts as ism_edge_training.defense, frame handling, tile mode."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from ism_edge import DefenseRuntime, Verdict
from ism_edge.errors import FrameError
from tests.ism_edge.conftest import edit_manifest


@pytest.fixture(scope="module")
def runtime(engine_dir: Path) -> DefenseRuntime:
    with DefenseRuntime(engine_dir, color_order="RGB") as rt:
        yield rt


# The untrained classifier's logits are almost flat: at the usual detector temperature the JSD is
# at float32 noise level. A low temperature makes it large enough to compare.
T_DETECTOR = 0.05


def _torch_reference(bundle_dir: Path, images: np.ndarray, thresholds: dict[str, float],
                     rounds: int) -> dict[str, np.ndarray]:
    import torch

    from ism_edge_training.bundle import DefenseBundle
    from ism_edge_training.defense import Defense

    bundle = DefenseBundle.load(bundle_dir)
    bundle.thresholds = dict(thresholds)
    bundle.temperatures["detector"] = T_DETECTOR
    defense = Defense(bundle, feedback_rounds=rounds).eval()
    x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        out = defense(x)
        again = bundle.mapper(out.x_hat)
    return {
        "recon_error": out.recon_error.numpy(),
        "jsd": out.jsd.numpy(),
        "p_score": out.p_score.numpy(),
        "flagged": out.flagged.numpy(),
        # The defense's own labels: C(x̂) for flagged inputs, C(x) for the others (label_source "auto").
        "label": out.logits.argmax(1).numpy(),
        "confidence": torch.softmax(out.logits / bundle.temperatures["deploy"], 1).max(1).values.numpy(),
        "x_hat": out.x_hat.permute(0, 2, 3, 1).numpy(),
        "residual_after": (out.x_hat - again).abs().flatten(1).mean(1).numpy(),
    }


@pytest.mark.parametrize("rounds", [0, 3])
def test_verdicts_match_the_pytorch_defense(
    rounds: int, untrained_bundle_dir: Path, engine_copy: Path, cifar_test: tuple[np.ndarray, np.ndarray]
) -> None:
    """recon_error, JSD, P, flagged, label, confidence and x̂ equal ism_edge_training.defense.Defense's.

    Without feedback the thresholds sit at the medians of the scores, so both verdicts occur;
    with feedback the reconstruction threshold sits at the median residual of x̂, so some
    samples need further rounds and others do not.
    """
    import torch

    from ism_edge_training.bundle import DefenseBundle
    from ism_edge_training.models import reconstruction_error

    images = cifar_test[0][:48]
    probe = _torch_reference(untrained_bundle_dir, images, {"recon_error": 1e9, "jsd": 1e9, "p_score": 1e9}, 0)
    thresholds = {k: float(np.median(probe[k])) for k in ("recon_error", "jsd", "p_score")}
    if rounds:
        x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
        mapper = DefenseBundle.load(untrained_bundle_dir).mapper
        with torch.no_grad():
            x_hat = mapper(x)
            thresholds["recon_error"] = float(np.median(reconstruction_error(x_hat, mapper(x_hat)).numpy()))
    edit_manifest(engine_copy, thresholds=thresholds, feedback_rounds=rounds,
                  temperatures={"deploy": 1.0, "detector": T_DETECTOR})
    ref = _torch_reference(untrained_bundle_dir, images, thresholds, rounds)

    with DefenseRuntime(engine_copy, color_order="RGB", purified=True) as rt:
        assert rt.backend.feedback_rounds == rounds
        verdicts = rt.process_batch(list(images))

    for key in ("recon_error", "p_score"):
        np.testing.assert_allclose([v.scores[key] for v in verdicts], ref[key], rtol=1e-4, atol=1e-5)
    assert float(np.median(ref["jsd"])) > 1e-4
    np.testing.assert_allclose([v.scores["jsd"] for v in verdicts], ref["jsd"], rtol=1e-3, atol=1e-6)
    assert [v.flagged for v in verdicts] == list(ref["flagged"])
    assert [v.label_index for v in verdicts] == list(ref["label"])
    np.testing.assert_allclose([v.confidence for v in verdicts], ref["confidence"], rtol=1e-4)
    purified = np.stack([v.purified for v in verdicts]).astype(np.float32) / 255.0
    assert np.abs(purified - ref["x_hat"]).max() <= 1.0 / 255.0 + 1e-5
    if rounds:
        assert 0 < sum(v.feedback_rounds > 0 for v in verdicts) < len(verdicts)
    else:
        assert all(v.feedback_rounds == 0 for v in verdicts)
        assert 0 < sum(v.flagged for v in verdicts) < len(verdicts)


def test_process_and_process_batch_agree(runtime: DefenseRuntime, cifar_test: tuple[np.ndarray, np.ndarray]) -> None:
    images = list(cifar_test[0][:70])  # more than the engines' maximum batch of 64: two chunks
    batch = runtime.process_batch(images)
    single = [runtime.process(im) for im in images[:5]] + [runtime.process(images[69])]
    assert len(batch) == 70
    for a, b in zip(single, batch[:5] + batch[69:], strict=True):
        assert a.label == b.label and a.flagged == b.flagged
        for k in a.scores:
            assert a.scores[k] == pytest.approx(b.scores[k], rel=1e-4, abs=1e-6)


def test_verdict_fields_come_from_the_manifest(runtime: DefenseRuntime, photos: list[np.ndarray]) -> None:
    v = runtime.process(photos[0])
    m = runtime.manifest
    assert isinstance(v, Verdict)
    assert v.label in m.class_names and m.class_names[v.label_index] == v.label
    assert 1.0 / m.num_classes - 1e-6 <= v.confidence <= 1.0
    assert v.thresholds == m.thresholds
    assert set(v.scores) == {"recon_error", "jsd", "p_score"}
    assert v.flagged == any(v.scores[k] > m.thresholds[k] for k in v.scores)
    assert set(v.flagged_by) == {k for k in v.scores if v.scores[k] > m.thresholds[k]}
    assert {"preprocess", "upload", "mapping", "classifier", "detectors", "download", "total"} <= set(v.timings_ms)
    assert all(t >= 0 for t in v.timings_ms.values())
    assert v.frame_size == photos[0].shape[:2]
    assert v.purified is None


def test_colour_order_is_honoured(engine_dir: Path, photos: list[np.ndarray]) -> None:
    """An RGB frame given to an RGB runtime equals the same frame in BGR given to a BGR runtime."""
    bgr = photos[1]
    with (DefenseRuntime(engine_dir, color_order="BGR") as rt_bgr,
          DefenseRuntime(engine_dir, color_order="RGB") as rt_rgb):
        a = rt_bgr.process(bgr)
        b = rt_rgb.process(np.ascontiguousarray(bgr[:, :, ::-1]))
        c = rt_rgb.process(bgr)
    assert a.scores == pytest.approx(b.scores)
    assert a.scores != pytest.approx(c.scores)


def test_any_frame_size_grey_and_float_frames(runtime: DefenseRuntime, photos: list[np.ndarray]) -> None:
    frame = photos[2]
    as_float = frame.astype(np.float32) / 255.0
    assert runtime.process(as_float).scores == pytest.approx(runtime.process(frame).scores, rel=1e-3, abs=1e-5)
    for shape in [(1, 1, 3), (7, 500, 3), (1080, 1920, 3)]:
        v = runtime.process(np.full(shape, 128, dtype=np.uint8))
        assert v.frame_size == shape[:2]
    grey = frame.mean(axis=2).astype(np.uint8)
    assert runtime.process(grey).frame_size == grey.shape


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (np.zeros((32, 32, 4), np.uint8), "shape"),
        (np.zeros((2, 32, 32, 3), np.uint8), "shape"),
        (np.zeros((0, 32, 3), np.uint8), "empty"),
        (np.zeros((32, 32, 3), np.int16), "dtype"),
        (np.full((32, 32, 3), np.nan, np.float32), "NaN"),
        (np.full((32, 32, 3), 255.0, np.float32), "[0, 1]"),
        ([[0, 1, 2]], "numpy array"),
    ],
)
def test_bad_frames_raise_one_line_frame_errors(runtime: DefenseRuntime, frame: object, message: str) -> None:
    with pytest.raises(FrameError) as err:
        runtime.process(frame)  # type: ignore[arg-type]
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_bad_frame_in_a_batch_is_named_and_nothing_runs(runtime: DefenseRuntime, photos: list[np.ndarray]) -> None:
    frames = [photos[0], photos[1], np.zeros((4, 4), np.float64) * np.nan]
    with pytest.raises(FrameError, match="frame 2 of the batch"):
        runtime.process_batch(frames)
    assert not runtime._inflight  # nothing was left enqueued
    assert runtime.process(photos[0]).label


def test_submit_before_collect_gives_the_same_verdicts(runtime: DefenseRuntime, photos: list[np.ndarray]) -> None:
    """Frame N+1 handed in before frame N is collected (the pipelined schedule)."""
    expected = [runtime.process(p) for p in photos]
    pending = [runtime.submit(photos[0])]
    got = []
    for p in photos[1:]:
        pending.append(runtime.submit(p))
        got.append(runtime.collect(pending.pop(0))[0])
    got.append(runtime.collect(pending.pop(0))[0])
    assert [g.scores for g in got] == [e.scores for e in expected]
    with pytest.raises(RuntimeError, match="already collected"):
        p = runtime.submit(photos[0])
        runtime.collect(p)
        runtime.collect(p)


def test_ready_says_whether_collect_would_wait(runtime: DefenseRuntime, photos: list[np.ndarray]) -> None:
    """ONNX Runtime computes at submit: ready at once; a collected frame is not ready again."""
    first, second = runtime.submit(photos[0]), runtime.submit(photos[1])
    assert runtime.ready(first) and runtime.ready(second)
    runtime.collect(first)
    assert not runtime.ready(first) and runtime.ready(second)
    runtime.collect(second)


def test_one_runtime_serves_several_threads(runtime: DefenseRuntime, photos: list[np.ndarray]) -> None:
    expected = {i: runtime.process(p).scores for i, p in enumerate(photos)}
    results: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(photos))}

    def work(i: int) -> None:
        for _ in range(5):
            results[i].append(runtime.process(photos[i]).scores)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(photos))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, scores in results.items():
        assert len(scores) == 5 and all(s == pytest.approx(expected[i]) for s in scores)


def test_tile_mode_scores_every_tile_and_aggregates(engine_dir: Path, photos: list[np.ndarray]) -> None:
    frame = photos[1][:100, :150]  # 100×150 → 4 rows × 5 cols of 32×32 tiles
    with DefenseRuntime(engine_dir, mode="tile", color_order="BGR", purified=True) as rt:
        v = rt.process(frame)
        with DefenseRuntime(engine_dir, color_order="BGR") as single:
            tile0 = single.process(np.ascontiguousarray(frame[:32, :32]))
    assert v.tiles is not None and (v.tiles.rows, v.tiles.cols) == (4, 5)
    assert len(v.tiles.boxes) == 20 and v.tiles.heat_map().shape == (4, 5)
    covered = np.zeros(frame.shape[:2], bool)
    for x, y, w, h in v.tiles.boxes:
        covered[y : y + h, x : x + w] = True
    assert covered.all()
    for k in v.scores:
        assert v.scores[k] == pytest.approx(max(v.tiles.scores[k]))
        assert v.tiles.scores[k][0] == pytest.approx(tile0.scores[k], rel=1e-4, abs=1e-6)
    assert v.flagged == any(v.tiles.flagged)
    assert all((s > 1.0) == f for s, f in zip(v.tiles.severity, v.tiles.flagged, strict=True))
    assert v.purified is not None and v.purified.shape == (100, 150, 3)


def test_tile_grid_resizes_to_an_exact_grid(engine_dir: Path, photos: list[np.ndarray]) -> None:
    with DefenseRuntime(engine_dir, mode="tile", tile_grid=(2, 3)) as rt:
        v = rt.process(photos[3])
    assert v.tiles is not None and (v.tiles.rows, v.tiles.cols) == (2, 3)
    assert v.to_json()["tiles"]["rows"] == 2


def test_invalid_options_are_refused(engine_dir: Path) -> None:
    for kwargs in ({"mode": "crop"}, {"color_order": "YUV"}, {"tile_grid": (0, 2)}, {"feedback_rounds": -1},
                   {"backend": "openvino"}):
        with pytest.raises(ValueError):
            DefenseRuntime(engine_dir, **kwargs)
