"""Frame sources: URI parsing, the drop-oldest queue, the reader thread, stalls and reconnects."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ism_edge.errors import SourceError
from ism_edge.sources import (
    Captured,
    CaptureSource,
    DropOldestQueue,
    FrameReader,
    PacedSource,
    ReaderOptions,
    Skipped,
    open_source,
    opencv_has_gstreamer,
    parse_source,
)
from tests.ism_edge.conftest import ScriptedSource
from tests.ism_edge.streams import MjpegServer

FRAME = np.zeros((24, 32, 3), np.uint8)


@pytest.mark.parametrize(
    ("text", "kind", "location"),
    [
        ("0", "camera", "0"),
        (3, "camera", "3"),
        ("v4l2:///dev/video0", "v4l2", "/dev/video0"),
        ("/dev/video2", "v4l2", "/dev/video2"),
        ("csi://0", "csi", "0"),
        ("rtsp://cam.local:8554/stream", "network", "rtsp://cam.local:8554/stream"),
        ("https://example.org/live.m3u8", "network", "https://example.org/live.m3u8"),
        ("file://clip.mp4", "video", "clip.mp4"),
        ("clip.mp4", "video", "clip.mp4"),
        ("photo.JPG", "image", "photo.JPG"),
    ],
)
def test_uris_follow_jetson_utils_conventions(text: str | int, kind: str, location: str) -> None:
    uri = parse_source(text)
    assert (uri.kind, uri.location) == (kind, location)
    assert uri.live == (kind in ("camera", "v4l2", "csi", "network"))


def test_a_streams_credentials_never_leave_its_location() -> None:
    """An IP camera's password is used to open it, but logs, summaries and errors name the stream without it."""
    uri = parse_source("rtsp://admin:s3cret@10.0.0.7:554/live?channel=1")
    assert uri.location == "rtsp://admin:s3cret@10.0.0.7:554/live?channel=1"
    assert str(uri) == "rtsp://***@10.0.0.7:554/live?channel=1"
    assert str(parse_source("rtsp://10.0.0.7/a@b")) == "rtsp://10.0.0.7/a@b"  # an @ in the path is no credential


def test_an_unreachable_stream_error_does_not_show_its_password() -> None:
    with pytest.raises(SourceError, match="could not be opened") as err:
        open_source("rtsp://admin:s3cret@127.0.0.1:9/stream", read_timeout=1.0)
    assert "s3cret" not in str(err.value) and "127.0.0.1:9/stream" in str(err.value)


def test_a_folder_uri_and_bad_uris(image_folder: Path) -> None:
    assert parse_source(f"file://{image_folder}").kind == "folder"
    assert parse_source(str(image_folder)).kind == "folder"
    for bad, words in [("ftp://host/x", "unsupported scheme"), ("csi://left", "sensor index"), ("", "no input")]:
        with pytest.raises(SourceError, match=words):
            parse_source(bad)


def test_drop_oldest_queue_keeps_the_newest_items() -> None:
    q: DropOldestQueue[int] = DropOldestQueue(2)
    dropped = [q.put(i) for i in range(5)]
    assert dropped == [False, False, True, True, True]
    assert q.dropped == 3 and len(q) == 2
    assert [q.get(timeout=0), q.get(timeout=0)] == [3, 4]
    with pytest.raises(queue.Empty):
        q.get(timeout=0.01)


def test_put_wait_blocks_until_there_is_room_or_stop() -> None:
    q: DropOldestQueue[int] = DropOldestQueue(1)
    stop = threading.Event()
    assert q.put_wait(1, stop)
    done: list[bool] = []
    t = threading.Thread(target=lambda: done.append(q.put_wait(2, stop)))
    t.start()
    time.sleep(0.1)
    assert not done  # still waiting: the queue is full
    assert q.get(timeout=1) == 1
    t.join(2)
    assert done == [True] and q.get(timeout=1) == 2 and q.dropped == 0
    q.put(3)
    stop.set()
    assert q.put_wait(4, stop) is False


def test_a_video_file_is_read_whole_in_order_then_ends(sample_video: Path) -> None:
    source = open_source(f"file://{sample_video}")
    assert not source.live and source.fps == pytest.approx(10.0)
    with FrameReader(source, ReaderOptions(queue_size=1)) as reader:
        frames = list(reader)
        assert reader.get() is None
    assert [f.index for f in frames] == list(range(12))
    assert frames[0].image.shape == (120, 160, 3) and frames[0].image.dtype == np.uint8
    assert reader.dropped == 0


def test_an_image_folder_skips_unreadable_files(image_folder: Path) -> None:
    (image_folder / "broken.png").write_bytes(b"not a png")
    (image_folder / "notes.txt").write_text("ignored")
    with FrameReader(open_source(image_folder)) as reader:
        items = list(reader)
    frames = [i for i in items if isinstance(i, Captured)]
    assert len(frames) == 4 and len({f.image.shape for f in frames}) == 4
    assert reader.skipped == 1
    # in name order, each named, the unreadable one in its place
    names = sorted(p.name for p in image_folder.glob("*.[jp][pn]g"))
    assert [(i.index, i.name) for i in items] == list(enumerate(names))
    assert isinstance(items[0], Skipped) and "broken.png" in items[0].reason


@pytest.mark.parametrize("name", ["missing.mp4", "missing_folder/", "missing.jpg"])
def test_missing_files_fail_at_open(tmp_path: Path, name: str) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        open_source(str(tmp_path / name))


def test_a_corrupt_video_fails_at_open(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00\x01garbage" * 1000)
    with pytest.raises(SourceError, match="could not be opened") as err:
        open_source(str(bad))
    assert str(bad) in str(err.value)


def test_a_camera_that_does_not_exist_is_a_clear_error() -> None:
    start = time.monotonic()
    with pytest.raises(SourceError, match="camera 97 could not be opened"):
        open_source(97)
    assert time.monotonic() - start < 10


def test_a_camera_whose_capture_fails_to_open() -> None:
    class Closed:
        def __init__(self, *args: object) -> None:
            self.args = args

        def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
            return False

    source = CaptureSource(parse_source("v4l2:///dev/video5"), capture=Closed)
    with pytest.raises(SourceError, match="/dev/video5 could not be opened"):
        source.open()


@pytest.mark.skipif(opencv_has_gstreamer(), reason="this OpenCV has GStreamer")
def test_csi_without_gstreamer_says_so() -> None:
    with pytest.raises(SourceError, match="GStreamer"):
        open_source("csi://0")


def test_a_stalled_source_is_a_clear_error_not_a_hang() -> None:
    source = ScriptedSource([FRAME, "block"])
    reader = FrameReader(source, ReaderOptions(stall_timeout=0.3)).start()
    try:
        assert reader.get() is not None
        start = time.monotonic()
        with pytest.raises(SourceError, match="no frame for 0.3 s"):
            reader.get()
        assert time.monotonic() - start < 2.0
    finally:
        source.release.set()
        reader.stop()


def test_a_stalled_stream_is_reconnected_like_a_lost_one() -> None:
    """An HTTP camera that stops sending but keeps its socket open is reopened (with backoff) after
    the stall timeout, as a closed connection is, instead of ending the run."""
    with MjpegServer(frames=5) as server:
        start = time.monotonic()
        source = open_source(server.url, read_timeout=1.0)
        opts = ReaderOptions(queue_size=64, stall_timeout=1.0, reconnect_attempts=3, reconnect_delay=0.1)
        with FrameReader(source, opts) as reader:
            got = [reader.get() for _ in range(8)]  # 5 from the first connection, 3 after the stall
    assert all(g is not None for g in got) and [g.index for g in got if g] == list(range(8))
    assert reader.reconnects == 1 and server.connections == 2 and reader.dropped == 0
    assert time.monotonic() - start < 20


def test_a_source_stuck_inside_a_read_is_a_clear_error_after_a_grace_period() -> None:
    """A live source whose read never returns cannot be reopened: after the stall timeout the reader
    gets one more to reconnect, then the consumer gets the stall error."""
    source = ScriptedSource([FRAME, "block"])
    reader = FrameReader(source, ReaderOptions(stall_timeout=0.3, reconnect_attempts=2)).start()
    try:
        assert reader.get() is not None
        start = time.monotonic()
        with pytest.raises(SourceError, match="no frame for 0.3 s"):
            reader.get()
        assert 0.55 < time.monotonic() - start < 2.0
    finally:
        source.release.set()
        reader.stop()


def test_backoff_schedule_doubles_up_to_the_cap() -> None:
    opts = ReaderOptions(reconnect_attempts=5, reconnect_delay=0.5, reconnect_max_delay=2.0)
    assert list(opts.delays()) == [0.5, 1.0, 2.0, 2.0, 2.0]
    with pytest.raises(ValueError):
        ReaderOptions(queue_size=0)


def test_a_lost_camera_is_reconnected() -> None:
    source = ScriptedSource([FRAME, None, FRAME, FRAME, "block"], opens=[False, True])  # block: no second loss
    opts = ReaderOptions(reconnect_attempts=3, reconnect_delay=0.01, stall_timeout=2.0)
    try:
        with FrameReader(source, opts) as reader:
            got = [reader.get(), reader.get(), reader.get()]
    finally:
        source.release.set()
    assert all(g is not None for g in got)
    assert reader.reconnects == 1 and source.open_calls == 2


def test_a_lost_camera_that_never_returns_ends_with_a_clear_error() -> None:
    source = ScriptedSource([FRAME, None], opens=[False] * 10)
    opts = ReaderOptions(reconnect_attempts=3, reconnect_delay=0.01, reconnect_max_delay=0.02, stall_timeout=0.5)
    with FrameReader(source, opts) as reader:
        assert reader.get() is not None
        with pytest.raises(SourceError, match="3 reconnection attempt") as err:
            reader.get()
        assert reader.get() is None
    assert "\n" not in str(err.value) and source.open_calls == 3


def test_live_sources_drop_the_oldest_frames() -> None:
    frames = [np.full((4, 4, 3), i, np.uint8) for i in range(20)]
    source = ScriptedSource(frames, live=False)
    reader = FrameReader(source, ReaderOptions(queue_size=3, drop=True)).start()
    reader._thread.join(5)
    got = list(reader)
    assert [int(f.image[0, 0, 0]) for f in got] == [18, 19]  # the end marker took the third place
    assert reader.dropped == 18


def test_a_crashing_decoder_reaches_the_consumer_as_one_line() -> None:
    source = ScriptedSource([FRAME, RuntimeError("decoder exploded")], live=False)
    with FrameReader(source) as reader:
        assert reader.get() is not None
        with pytest.raises(SourceError, match="reading failed .*decoder exploded"):
            reader.get()


def test_paced_source_is_live_loops_and_never_runs_early() -> None:
    frames = [np.full((4, 4, 3), i, np.uint8) for i in range(3)]
    paced = PacedSource(ScriptedSource(list(frames), live=False), fps=50.0, loop=False)
    assert paced.live and paced.fps == 50.0
    t0 = time.perf_counter()
    got = [paced.read() for _ in range(4)]
    assert [int(g[0, 0, 0]) for g in got[:3]] == [0, 1, 2] and got[3] is None
    assert time.perf_counter() - t0 >= 2 / 50.0  # frame 2 is released 2 periods after frame 0

    class Rewinding(ScriptedSource):
        def open(self) -> None:
            super().open()
            self.reads = list(frames)

    looping = PacedSource(Rewinding([], live=False), fps=1000.0, loop=True)
    looping.open()
    assert [int(looping.read()[0, 0, 0]) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
