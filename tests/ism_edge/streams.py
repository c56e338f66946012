"""A loopback network camera for the tests: multipart MJPEG over HTTP, as IP cameras serve it."""

from __future__ import annotations

import http.server
import socketserver
import threading
from types import TracebackType

import cv2
import numpy as np


class MjpegServer:
    """An HTTP server on 127.0.0.1 that streams ``frames`` JPEG frames per connection, paced at
    ``interval`` s, then *stalls*: it keeps the connection open and sends nothing (until
    :meth:`close`, or ``stall_s`` seconds), like a camera whose encoder hung. ``connections``
    counts the clients. Use as a context manager; it stops by itself when the block ends.
    """

    def __init__(self, frames: int = 5, *, interval: float = 0.02, stall_s: float = 30.0) -> None:
        self.frames = [cv2.imencode(".jpg", np.full((48, 64, 3), 40 + 20 * i, np.uint8))[1].tobytes()
                       for i in range(frames)]
        self.interval = interval
        self.stall_s = stall_s
        self.connections = 0
        self._release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return None

            def do_GET(self) -> None:
                server.connections += 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    for jpeg in server.frames:
                        head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
                        self.wfile.write(head + jpeg + b"\r\n")
                        self.wfile.flush()
                        if server._release.wait(server.interval):
                            return
                except OSError:  # the client went away
                    return
                server._release.wait(server.stall_s)  # the stall: the socket stays open, nothing comes

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/stream.mjpg"
        self._thread = threading.Thread(target=self._server.serve_forever, name="mjpeg server", daemon=True)

    def __enter__(self) -> MjpegServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
