"""Outputs: the verdict log, video and image writers (atomic), the window, annotation."""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from pathlib import Path

import cv2
import numpy as np
import pytest

from ism_edge import outputs
from ism_edge.errors import MissingDependencyError
from ism_edge.outputs import (
    DisplayOutput,
    ImageFolderOutput,
    OutputError,
    OutputPath,
    VerdictLog,
    VideoFileOutput,
    check_output_paths,
    opencv_has_gui,
    parse_output,
)
from ism_edge.render import GREEN, RED, WHITE, annotate, border_width, verdict_lines
from ism_edge.verdict import TileScores, Verdict
from tests.ism_edge.conftest import count_video_frames


def make_verdict(flagged: bool, *, tiles: TileScores | None = None, jsd: float = 0.001) -> Verdict:
    scores = {"recon_error": 0.5 if flagged else 0.01, "jsd": jsd, "p_score": 0.1}
    thresholds = {"recon_error": 0.1, "jsd": 0.01, "p_score": 0.5}
    return Verdict(
        label="cat", label_index=3, confidence=0.8, scores=scores, thresholds=thresholds, flagged=flagged,
        flagged_by=("recon_error",) if flagged else (), timings_ms={"mapping": 1.0}, tiles=tiles,
    )  # fmt: skip


def test_output_uris() -> None:
    assert parse_output("display://0").kind == "display"
    assert parse_output("file://out.mp4").kind == "video"
    assert parse_output("out.avi").location == "out.avi"
    assert parse_output("frames/").kind == "images"
    for bad in ("rtp://host:1234", "out.gif"):
        with pytest.raises(OutputError):
            parse_output(bad)


def test_output_paths_that_would_destroy_something_are_refused(tmp_path: Path) -> None:
    video, engines, photos = tmp_path / "in.mp4", tmp_path / "engines", tmp_path / "photos"
    video.write_bytes(b"video")
    engines.mkdir()
    photos.mkdir()
    (photos / "frame_000000.jpg").write_bytes(b"jpeg")
    (tmp_path / "alias").symlink_to(tmp_path)

    def check(*outs: OutputPath, source: Path = video) -> None:
        check_output_paths(outs, source=source, source_is_folder=source.is_dir(), engine_dir=engines)

    fine = [OutputPath("OUTPUT", tmp_path / "out.mp4"), OutputPath("--log", tmp_path / "v.jsonl"),
            OutputPath("--purified", tmp_path / "purified", folder=True)]
    check(*fine)
    check(OutputPath("OUTPUT", photos / "annotated", folder=True), OutputPath("--log", photos / "v.jsonl"),
          source=photos)
    bad = {
        "is the input": [OutputPath("OUTPUT", tmp_path / "alias" / "in.mp4")],  # through a linked folder
        "the same file": [*fine, OutputPath("--summary-json", tmp_path / "alias" / "v.jsonl")],
        "engine directory": [OutputPath("--log", tmp_path / "alias" / "engines" / "new" / "v.jsonl")],
    }
    for words, outs in bad.items():
        with pytest.raises(OutputError, match=words):
            check(*outs)
    with pytest.raises(OutputError, match="is the input"):  # would replace the input image frame_000000.jpg
        check(OutputPath("OUTPUT", photos, folder=True), source=photos / "frame_000000.jpg")
    with pytest.raises(OutputError, match="is the input"):  # would be read as one of the folder's images
        check(OutputPath("--summary-json", photos / "summary.png"), source=photos)


def test_verdict_log_appends_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "v.jsonl"
    for run in range(2):
        log = VerdictLog(path)
        for i in range(3):
            log.write({"run": run, "frame": i})
        assert len(path.read_text().splitlines()) == 3 * run + 3  # flushed per line, before close
        log.close()
    assert [json.loads(line)["frame"] for line in path.read_text().splitlines()] == [0, 1, 2] * 2


def test_verdict_log_repairs_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "v.jsonl"
    path.write_text('{"frame": 0}\n{"frame": 1, "lab')  # an earlier run died mid-line
    log = VerdictLog(path)
    log.write({"frame": 2})
    log.close()
    lines = path.read_text().splitlines()
    assert lines[-1] == '{"frame":2}' and json.loads(lines[0]) == {"frame": 0}


def test_verdict_json_is_strict_even_with_non_finite_scores(tmp_path: Path) -> None:
    record = make_verdict(False, jsd=math.nan).to_json()
    assert record["scores"]["jsd"] is None
    log = VerdictLog(tmp_path / "v.jsonl")
    log.write(record)
    log.close()
    assert json.loads((tmp_path / "v.jsonl").read_text())["label"] == "cat"


def test_unwritable_log_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot be opened"):
        VerdictLog(blocker / "v.jsonl")


def test_video_output_appears_only_when_closed(tmp_path: Path, photos: list[np.ndarray]) -> None:
    path = tmp_path / "out.avi"
    out = VideoFileOutput(path, fps=5)
    for p in photos:  # different sizes: resized to the first
        out.write(p)
    assert not path.exists() and len(list(tmp_path.iterdir())) == 1  # only the temporary file
    out.close()
    assert path.is_file() and count_video_frames(path) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["out.avi"]


def test_an_empty_video_output_leaves_nothing(tmp_path: Path) -> None:
    VideoFileOutput(tmp_path / "out.mp4").close()
    assert list(tmp_path.iterdir()) == []


def test_image_folder_output(tmp_path: Path, photos: list[np.ndarray]) -> None:
    out = ImageFolderOutput(tmp_path / "frames")
    for p in photos[:2]:
        out.write(p)
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["frame_000000.jpg", "frame_000001.jpg"]


@pytest.mark.skipif(opencv_has_gui(), reason="this OpenCV has a GUI")
def test_display_without_a_gui_says_how_to_fix_it() -> None:
    with pytest.raises(MissingDependencyError, match="--headless"):
        DisplayOutput()


def test_annotation_draws_a_green_or_red_border_and_keeps_the_input(photos: list[np.ndarray]) -> None:
    frame = photos[0]
    before = frame.copy()
    clean = annotate(frame, make_verdict(False), fps=25.0)
    bad = annotate(frame, make_verdict(True))
    assert np.array_equal(frame, before)
    assert clean.shape == bad.shape == frame.shape and clean.dtype == np.uint8
    h, w = frame.shape[:2]
    for y, x in ((h - 1, w // 2), (h // 2, w - 1), (h - 2, 1)):
        assert tuple(int(c) for c in clean[y, x]) == GREEN
        assert tuple(int(c) for c in bad[y, x]) == RED
    assert np.abs(clean[10:40, 10:120].astype(int) - frame[10:40, 10:120]).sum() > 0  # the text panel


def test_the_border_is_thick_and_flagged_frames_get_a_white_on_red_box(photos: list[np.ndarray]) -> None:
    frame = np.full((480, 640, 3), 128, np.uint8)
    bad = annotate(frame, make_verdict(True))
    border = border_width(480, 640)
    assert border == 12 and border_width(32, 32) == 6
    assert all(tuple(int(c) for c in bad[240, x]) == RED for x in range(border))  # the whole border width
    box = bad[border + 2:border + 40, border + 2:border + 180]
    red = np.all(box == RED, axis=2).mean()
    white = np.all(box == WHITE, axis=2).mean()
    assert red > 0.4 and white > 0.03  # a solid red box with white text
    clean_box = annotate(frame, make_verdict(False))[border + 2:border + 40, border + 2:border + 180]
    assert np.all(clean_box == WHITE, axis=2).mean() == 0  # no white-on-red box when clean


def test_the_frame_number_is_drawn() -> None:
    frame = np.full((240, 320, 3), 128, np.uint8)
    one, two = annotate(frame, make_verdict(False), frame=1), annotate(frame, make_verdict(False), frame=2)
    assert not np.array_equal(one, two)
    assert verdict_lines(make_verdict(False), frame=12345)[0] == "frame 12,345"


def test_numbers_on_the_frame_have_one_format() -> None:
    verdict = make_verdict(True, jsd=0.1)
    lines = verdict_lines(verdict, fps=25.0, frame=7)
    assert lines == ["frame 7", "cat 80.0%", "recon 0.500 / 0.100 !", "jsd 0.100 / 0.010", "P 0.100 / 0.500",
                     "25.0 FPS"]
    off = Verdict(label="cat", label_index=3, confidence=0.8, scores={"jsd": 0.002}, thresholds={"jsd": 1e6},
                  flagged=False, flagged_by=(), timings_ms={})
    assert verdict_lines(off) == ["cat 80.0%", "jsd 0.002 / off"]  # a detector turned off, not "1e+06"


def test_heat_map_colours_the_flagged_tiles() -> None:
    frame = np.full((256, 256, 3), 128, np.uint8)
    tiles = TileScores(
        rows=1, cols=2, boxes=((0, 0, 128, 256), (128, 0, 128, 256)), scores={"recon_error": (0.01, 0.9)},
        flagged=(False, True), labels=("a", "b"), severity=(0.1, 9.0),
    )  # fmt: skip
    out = annotate(frame, make_verdict(True, tiles=tiles))
    left, right = out[230, 64].astype(int), out[230, 192].astype(int)
    assert right[2] > left[2] and left[1] > right[1]  # red on the flagged tile, green on the other


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_mode_the_umask_gives(tmp_path: Path, photos: list[np.ndarray], umask: int) -> None:
    """The video is written to a private temporary file first; it must still end up like every other output."""
    previous = os.umask(umask)
    try:
        video = VideoFileOutput(tmp_path / "out.avi", fps=5)
        video.write(photos[0])
        video.close()
        log = VerdictLog(tmp_path / "v.jsonl")
        log.write({"frame": 0})
        log.close()
        ImageFolderOutput(tmp_path / "frames").write(photos[0])
    finally:
        os.umask(previous)
    for path in (tmp_path / "out.avi", tmp_path / "v.jsonl", tmp_path / "frames" / "frame_000000.jpg"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


class _DiskFullAfter:
    """Stands in for the ``os`` module of ism_edge.outputs: ``write`` stores up to ``room`` more
    bytes (a short write at the edge), then fails with ENOSPC, as a full disk does."""

    def __init__(self, room: int) -> None:
        self.room = room

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def write(self, fd: int, data: bytes) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = os.write(fd, bytes(data[: self.room]))
        self.room -= n
        return n


def test_a_log_line_cut_by_a_full_disk_is_rolled_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "v.jsonl"
    path.write_text('{"run":0}\n')
    log = VerdictLog(path)
    monkeypatch.setattr(outputs, "os", _DiskFullAfter(room=60))
    log.write({"frame": 0, "label": "cat"})
    with pytest.raises(OutputError, match="v.jsonl cannot be written .*after 1 lines"):
        log.write({"frame": 1, "label": "cat", "padding": "x" * 80})  # only part of it fits
    monkeypatch.undo()
    log.close()
    assert path.read_text() == '{"run":0}\n{"frame":0,"label":"cat"}\n'
    assert log.lines == 1 and log.failed


class _FailingWriter:
    """A cv2.VideoWriter that reports frame ``fail_at`` and every later one as not written."""

    fail_at = 3
    real = cv2.VideoWriter
    fourcc = staticmethod(cv2.VideoWriter.fourcc)

    def __init__(self, *args: object) -> None:
        self._real = self.real(*args)
        self._n = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def write(self, image: np.ndarray) -> bool:
        if self._n >= self.fail_at:
            return False
        self._n += 1
        self._real.write(image)
        return True


def test_a_video_frame_that_cannot_be_written_stops_and_keeps_what_reads_back(
    tmp_path: Path, photos: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failed video never replaces an existing file of that name; its readable frames are kept aside."""
    path = tmp_path / "out.avi"
    path.write_bytes(b"an earlier video")
    monkeypatch.setattr(outputs.cv2, "VideoWriter", _FailingWriter)
    video = VideoFileOutput(path, fps=5)
    for p in photos[:3]:
        video.write(p)
    with pytest.raises(OutputError, match="out.avi: frame 3 cannot be written"):
        video.write(photos[3])
    monkeypatch.undo()
    with pytest.raises(OutputError, match=r"incomplete: the 3 frames .* kept in .*out\.partial\.avi"):
        video.close()
    assert path.read_bytes() == b"an earlier video" and video.failed and video.frames == 3
    assert count_video_frames(tmp_path / "out.partial.avi") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.avi", "out.partial.avi"]


def test_an_unreadable_video_is_not_kept(tmp_path: Path, photos: list[np.ndarray],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write reported success but the finished file does not read back (its index was lost)."""
    video = VideoFileOutput(tmp_path / "out.mp4", fps=5)
    video.write(photos[0])
    assert video._tmp is not None
    real_release = video._writer.release

    def release() -> None:
        real_release()
        video_tmp.write_bytes(b"\x00" * 64)  # what a full disk leaves of it

    video_tmp = video._tmp
    monkeypatch.setattr(video, "_writer", type("W", (), {"release": staticmethod(release)})())
    with pytest.raises(OutputError, match="none of its 1 frames can be read back, so nothing was kept"):
        video.close()
    assert list(tmp_path.iterdir()) == [] and video.frames == 0 and video.failed


def test_an_image_that_cannot_be_written_is_an_error(tmp_path: Path, photos: list[np.ndarray],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = ImageFolderOutput(tmp_path / "frames")
    out.write(photos[0])
    monkeypatch.setattr(outputs.cv2, "imwrite", lambda *args: False)
    with pytest.raises(OutputError, match="frame_000001.jpg cannot be written"):
        out.write(photos[1])
    assert [p.name for p in (tmp_path / "frames").iterdir()] == ["frame_000000.jpg"] and out.frames == 1 and out.failed
