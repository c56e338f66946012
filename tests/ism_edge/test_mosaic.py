"""The tiled mosaic of several sources: grid, letterboxed cells, labels, states, one frame per batch."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from ism_edge import DefenseRuntime
from ism_edge.mosaic import Mosaic, check_cell, mosaic_grid, short_uri
from ism_edge.multi_stream import MultiStream, SourceOutputs, run_multi_stream
from ism_edge.outputs import FrameSink, VideoFileOutput
from tests.ism_edge.conftest import ScriptedSource, count_video_frames, video_frames, write_video

RED, BLUE = (0, 0, 255), (255, 0, 0)  # BGR


class Recorder(FrameSink):
    """A sink that keeps a copy of every frame written to it (and which buffer it was)."""

    def __init__(self) -> None:
        self.images: list[np.ndarray] = []
        self.buffers: list[int] = []

    def write(self, image: np.ndarray) -> None:
        self.images.append(image.copy())
        self.buffers.append(id(image))


def cell_of(image: np.ndarray, index: int, cols: int, cell: tuple[int, int]) -> np.ndarray:
    width, height = cell
    row, col = divmod(index, cols)
    return image[row * height:(row + 1) * height, col * width:(col + 1) * width]


def clear_patch(cell: np.ndarray) -> np.ndarray:
    """Mean BGR of a patch low and right of a 4:3 frame that fills its cell: clear of the verdict
    border, the status box and score panel (top left) and the mosaic's label (bottom left)."""
    h, w = cell.shape[:2]
    return cell[int(h * 0.6):int(h * 0.75), int(w * 0.65):int(w * 0.85)].reshape(-1, 3).mean(axis=0)


def state_cell(uris: list[str], index: int, state: str, cell: tuple[int, int], cols: int) -> np.ndarray:
    """How a fresh mosaic draws ``state`` in cell ``index``."""
    rec = Recorder()
    mosaic = Mosaic(rec, uris, cell=cell)
    mosaic.mark(index, state)
    mosaic.write()
    return cell_of(rec.images[0], index, cols, cell)


@pytest.mark.parametrize(("n", "grid"), [(1, (1, 1)), (2, (1, 2)), (3, (2, 2)), (4, (2, 2)), (5, (2, 3)),
                                         (6, (2, 3)), (7, (3, 3)), (9, (3, 3)), (10, (3, 4)), (16, (4, 4))])
def test_the_grid_follows_the_source_count(n: int, grid: tuple[int, int]) -> None:
    assert mosaic_grid(n) == grid
    rows, cols = grid
    assert rows * cols >= n and (rows - 1) * cols < n  # no empty row


def test_a_given_grid_must_hold_every_source() -> None:
    assert mosaic_grid(3, (3, 1)) == (3, 1) and mosaic_grid(2, (2, 2)) == (2, 2)
    with pytest.raises(ValueError, match="has 2 cells for 3 sources: give at least 3 cells"):
        mosaic_grid(3, (1, 2))
    with pytest.raises(ValueError, match="rows and columns must be >= 1"):
        mosaic_grid(2, (0, 2))
    with pytest.raises(ValueError, match="each side must be 32 to 4096"):
        check_cell((16, 480))
    with pytest.raises(ValueError, match="one of no signal, ended, failed"):
        Mosaic(Recorder(), ["a", "b"]).mark(0, "gone")


def test_labels_name_the_source_without_credentials() -> None:
    assert short_uri("rtsp://admin:secret@10.0.0.7:554/live/main") == "10.0.0.7:554/live/main"
    assert short_uri("/data/videos/gate.mp4") == "gate.mp4"
    assert short_uri("file:///data/videos/gate.mp4") == "gate.mp4"
    assert short_uri("camera 0") == "camera 0"
    long = "rtsp://cam.example.org/" + "x" * 200
    mosaic = Mosaic(Recorder(), [long, "b"], cell=(160, 120))
    assert ".." in mosaic._labels[0] and mosaic._labels[0].startswith("0 cam.")
    assert cv2.getTextSize(mosaic._labels[0], cv2.FONT_HERSHEY_SIMPLEX, mosaic._scale, mosaic._thick)[0][0] < 160


def test_a_frame_is_letterboxed_into_its_cell_of_one_reused_canvas() -> None:
    rec = Recorder()
    mosaic = Mosaic(rec, ["a.mp4", "b.mp4", "c.mp4"], cell=(200, 100))
    assert mosaic.canvas.shape == (200, 400, 3)  # 2 × 2 cells of 200 × 100
    canvas = mosaic.canvas
    mosaic.cell(0).write(np.full((40, 40, 3), RED, np.uint8))  # square: 100 × 100 in the middle of 200 × 100
    mosaic.cell(2).write(np.full((20, 80), 200, np.uint8))  # grey and wide: 200 × 50, bars above and below
    mosaic.write()
    mosaic.write()
    assert mosaic.canvas is canvas and rec.buffers[0] == rec.buffers[1] == id(canvas) and mosaic.rounds == 2
    c0, c2, c3 = (cell_of(rec.images[0], i, 2, (200, 100)) for i in (0, 2, 3))
    assert (c0[5:70, 55:145] == RED).all() and (c0[:70, :45] == 0).all() and (c0[:70, 155:] == 0).all()
    assert (c2[30:60, 150:195] == 200).all() and (c2[:20, 100:] == 0).all()
    assert (c0[75:, :60] > 200).any()  # the white label text, bottom left
    assert mosaic.state(0) is None and mosaic.state(1) == "no signal"
    assert (c3 == 0).all()  # the fourth cell belongs to no source


def test_a_frame_of_another_shape_clears_the_old_bars() -> None:
    rec = Recorder()
    mosaic = Mosaic(rec, ["a", "b"], cell=(200, 100))
    mosaic.cell(0).write(np.full((20, 200, 3), BLUE, np.uint8))  # 200 × 20: fills the width
    mosaic.cell(0).write(np.full((40, 40, 3), RED, np.uint8))
    mosaic.write()
    c0 = cell_of(rec.images[0], 0, 2, (200, 100))
    assert (c0[:70, 160:] == 0).all() and not (c0 == BLUE).all(axis=2).any()


def test_a_state_shows_from_the_first_round_without_a_frame_of_its_source() -> None:
    uris = ["a.mp4", "b.mp4"]
    rec = Recorder()
    mosaic = Mosaic(rec, uris, cell=(160, 120))
    mosaic.write()
    no_signal = state_cell(uris, 0, "no signal", (160, 120), 2)
    assert (cell_of(rec.images[0], 0, 2, (160, 120)) == no_signal).all()  # every cell starts so
    mosaic.mark(0, "ended")
    mosaic.cell(0).write(np.full((120, 160, 3), RED, np.uint8))  # its last frame, judged after the end was known
    mosaic.write()
    assert mosaic.state(0) is None and (clear_patch(cell_of(rec.images[1], 0, 2, (160, 120))) == RED).all()
    mosaic.write()
    ended = state_cell(uris, 0, "ended", (160, 120), 2)
    assert mosaic.state(0) == "ended" and (cell_of(rec.images[2], 0, 2, (160, 120)) == ended).all()
    assert not (ended == no_signal).all()
    mosaic.mark(1, "no signal")
    mosaic.unmark(1)  # it opened after all
    mosaic.cell(1).write(np.full((120, 160, 3), BLUE, np.uint8))
    mosaic.write()
    assert mosaic.state(1) is None


# -- in the multi-stream loop ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime(engine_dir: Path) -> DefenseRuntime:
    with DefenseRuntime(engine_dir) as rt:
        yield rt


def solid(colour: tuple[int, int, int], count: int, size: tuple[int, int]) -> ScriptedSource:
    """A file-like source of ``count`` frames of one colour, ``size`` (width, height)."""
    return ScriptedSource([np.full((size[1], size[0], 3), colour, np.uint8) for _ in range(count)], live=False)


def test_one_mosaic_frame_per_batch_holds_every_source_and_then_ended(runtime: DefenseRuntime) -> None:
    rec = Recorder()
    multi = MultiStream(runtime, [solid(RED, 3, (320, 240)), solid(BLUE, 6, (480, 360))])
    mosaic = Mosaic(rec, multi.uris)
    summary = run_multi_stream(runtime, multi, mosaic=mosaic)
    assert summary.failure is None and summary.total.frames == 9
    assert len(rec.images) == mosaic.rounds == summary.batches >= 6  # a source gives at most one frame a batch
    assert all(im.shape == (480, 1280, 3) for im in rec.images)  # 1 × 2 cells of 640 × 480
    ended = state_cell(multi.uris, 0, "ended", (640, 480), 2)
    colours = [[clear_patch(cell_of(im, i, 2, (640, 480))) for i in (0, 1)] for im in rec.images]
    red_rounds = [k for k, (c0, _) in enumerate(colours) if np.allclose(c0, RED, atol=1)]
    assert len(red_rounds) >= 3 and red_rounds == list(range(red_rounds[0], red_rounds[-1] + 1))
    assert (cell_of(rec.images[-1], 0, 2, (640, 480)) == ended).all()  # source 0 ended before the last batch
    assert np.allclose(colours[-1][1], BLUE, atol=1)
    assert sum(np.allclose(c1, BLUE, atol=1) for _, c1 in colours) >= 6  # from its first frame to the end
    assert summary.total.to_json()["outputs"] == []  # a sink without a path is not listed


def test_a_source_that_cannot_be_opened_is_a_failed_cell(runtime: DefenseRuntime, tmp_path: Path) -> None:
    rec = Recorder()
    multi = MultiStream(runtime, [str(tmp_path / "missing.mp4"), solid(BLUE, 2, (320, 240))])
    run_multi_stream(runtime, multi, mosaic=Mosaic(rec, multi.uris, cell=(320, 240)))
    failed = state_cell(multi.uris, 0, "failed", (320, 240), 2)
    assert rec.images and all((cell_of(im, 0, 2, (320, 240)) == failed).all() for im in rec.images)


def test_a_mosaic_video_next_to_outputs_per_source(runtime: DefenseRuntime, sample_video: Path,
                                                   photos: list[np.ndarray], tmp_path: Path) -> None:
    small = write_video(tmp_path / "small.avi", video_frames(photos, 7, (96, 64)), fps=5.0)
    wall = tmp_path / "wall.mp4"
    multi = MultiStream(runtime, [sample_video, small, sample_video])
    per_source = [SourceOutputs([VideoFileOutput(tmp_path / f"out_{i}.mp4", fps=10)]) for i in range(3)]
    summary = run_multi_stream(runtime, multi, outputs=per_source,
                               mosaic=Mosaic(VideoFileOutput(wall, fps=10), multi.uris, cell=(160, 120)))
    assert summary.failure is None and summary.total.frames == 12 + 7 + 12
    assert count_video_frames(wall) == summary.batches < summary.total.frames
    cap = cv2.VideoCapture(str(wall))
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    cap.release()
    assert size == (320, 240)  # 2 × 2 cells of 160 × 120 for three sources
    assert [count_video_frames(tmp_path / f"out_{i}.mp4") for i in range(3)] == [12, 7, 12]
    entries = summary.total.to_json()["outputs"]
    assert {"output": "mosaic", "path": str(wall), "frames": summary.batches, "complete": True} in entries
    assert [e["output"] for e in entries].count("video") == 3


def test_the_mosaic_must_have_a_cell_per_source(runtime: DefenseRuntime, sample_video: Path) -> None:
    multi = MultiStream(runtime, [sample_video, sample_video])
    with pytest.raises(ValueError, match="a mosaic of 3 cells for 2 sources"):
        run_multi_stream(runtime, multi, mosaic=Mosaic(Recorder(), ["a", "b", "c"]))


def test_a_closed_mosaic_window_stops_the_run(runtime: DefenseRuntime) -> None:
    class Window(Recorder):
        def write(self, image: np.ndarray) -> None:
            super().write(image)
            self.stop_requested = len(self.images) >= 2  # q pressed on the second frame

    window = Window()
    multi = MultiStream(runtime, [solid(RED, 40, (64, 48)), solid(BLUE, 40, (64, 48))])
    summary = run_multi_stream(runtime, multi, mosaic=Mosaic(window, multi.uris, cell=(64, 48)))
    assert summary.stopped == "window" and summary.failure is None
    assert len(window.images) == 2 and summary.total.frames < 80


def test_a_mosaic_that_cannot_be_written_ends_the_run_with_its_error(runtime: DefenseRuntime,
                                                                     tmp_path: Path) -> None:
    from ism_edge.errors import OutputError
    from ism_edge.outputs import VerdictLog

    class Full(Recorder):
        def write(self, image: np.ndarray) -> None:
            if self.images:
                self.failed = True
                raise OutputError("mosaic wall.mp4: frame 1 cannot be written: check free disk space")
            super().write(image)

    multi = MultiStream(runtime, [solid(RED, 20, (64, 48)), solid(BLUE, 20, (64, 48))])
    log = tmp_path / "v.jsonl"
    summary = run_multi_stream(runtime, multi, log=VerdictLog(log), mosaic=Mosaic(Full(), multi.uris, cell=(64, 48)))
    assert isinstance(summary.failure, OutputError) and "frame 1 cannot be written" in str(summary.failure)
    assert summary.stopped == "error" and 2 <= summary.total.frames < 40
    assert len(log.read_text().splitlines()) == summary.total.frames  # every verdict before it is logged
