"""Frame → model input: resize and tile layouts, colour order, and the way back."""

from __future__ import annotations

import numpy as np
import pytest

from ism_edge import preprocess


@pytest.mark.parametrize(("length", "tile"), [(32, 32), (33, 32), (100, 32), (640, 32), (20, 32), (96, 32)])
def test_tile_positions_cover_the_length_exactly_once_or_with_overlap(length: int, tile: int) -> None:
    starts = preprocess.tile_positions(length, tile)
    assert starts[0] == 0 and len(starts) == max(1, -(-length // tile))
    if length >= tile:
        assert starts[-1] + tile == length
        assert all(b - a <= tile for a, b in zip(starts, starts[1:], strict=False))  # no gaps
        assert starts == sorted(set(starts))


def test_resize_input_is_nchw_float_in_unit_range(photos: list[np.ndarray]) -> None:
    x = preprocess.resize_input(photos[0], (3, 32, 32), color_order="BGR", model_order="RGB")
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32 and x.flags.c_contiguous
    assert 0.0 <= x.min() and x.max() <= 1.0
    flat = np.full((10, 10, 3), (10, 20, 30), np.uint8)
    y = preprocess.resize_input(flat, (3, 32, 32), color_order="BGR", model_order="RGB")
    assert y[0, :, 5, 5] == pytest.approx(np.array([30, 20, 10]) / 255.0)


def test_one_channel_models_get_luma(photos: list[np.ndarray]) -> None:
    x = preprocess.resize_input(photos[1], (1, 32, 32))
    assert x.shape == (1, 1, 32, 32)


def test_tiles_reproduce_the_frame(photos: list[np.ndarray]) -> None:
    frame = photos[1][:70, :100]
    tiles, layout = preprocess.tile_input(frame, (3, 32, 32), color_order="BGR", model_order="RGB")
    assert (layout.rows, layout.cols) == (3, 4) and tiles.shape == (12, 3, 32, 32)
    back = preprocess.stitch_tiles(tiles, layout, color_order="BGR", model_order="RGB")
    assert back.shape == frame.shape and np.array_equal(back, frame)
    x, y, w, h = layout.boxes[-1]
    assert (x + w, y + h) == (100, 70)


def test_small_frames_are_enlarged_to_one_tile_and_grids_are_exact() -> None:
    tiles, layout = preprocess.tile_input(np.zeros((10, 20, 3), np.uint8), (3, 32, 32))
    assert tiles.shape[0] == 2 and layout.frame_size == (10, 20)  # 10×20 → 32×64 → 1×2 tiles
    assert all(0 <= x and 0 <= y and x + w <= 20 and y + h <= 10 for x, y, w, h in layout.boxes)
    tiles, layout = preprocess.tile_input(np.zeros((480, 640, 3), np.uint8), (3, 32, 32), grid=(3, 4))
    assert tiles.shape[0] == 12 and layout.tiled_size == (96, 128)


def test_model_output_back_to_the_callers_colour_order() -> None:
    x = np.zeros((3, 2, 2), np.float32)
    x[0] = 1.0  # red in an RGB model
    assert preprocess.from_model_output(x, color_order="BGR", model_order="RGB")[0, 0].tolist() == [0, 0, 255]
    assert preprocess.from_model_output(x, color_order="RGB", model_order="RGB")[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize(("mode", "grid"), [("resize", None), ("tile", None), ("tile", (2, 3))])
def test_frame_preparer_in_parallel_writes_what_one_thread_writes(photos: list[np.ndarray], mode: str, grid) -> None:
    frames = [p[: 40 + 7 * i, : 50 + 5 * i] for i, p in enumerate((photos * 3)[:7])]  # mixed sizes
    serial = preprocess.FramePreparer((3, 16, 16), mode=mode, tile_grid=grid, workers=1)
    parallel = preprocess.FramePreparer((3, 16, 16), mode=mode, tile_grid=grid, workers=3)
    n = sum(serial.count(f) for f in frames)
    a, b = np.full((n, 3, 16, 16), np.nan, np.float32), np.full((n, 3, 16, 16), np.nan, np.float32)
    got_a, got_b = serial.prepare(frames, a), parallel.prepare(frames, b)
    np.testing.assert_array_equal(a, b)  # every slot written, in frame order, identically
    assert [la for la, _ in got_a] == [lb for lb, _ in got_b] and all(ms > 0 for _, ms in got_b)
    start = 0
    for frame, (layout, _) in zip(frames, got_b, strict=True):  # frame i's inputs are where the serial path puts them
        if mode == "resize":
            one = preprocess.resize_input(frame, (3, 16, 16))
        else:
            one, want = preprocess.tile_input(frame, (3, 16, 16), grid=grid)
            assert layout == want
        np.testing.assert_array_equal(b[start : start + len(one)], one)
        start += len(one)
    assert serial._pool is None  # one worker never starts a thread
    parallel.close()
    assert parallel._pool is None
    with pytest.raises(ValueError, match="model inputs"):
        parallel.prepare(frames, b[:-1])
