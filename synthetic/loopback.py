"""A real HTTP server on 127.0.0.1 serving a folder, standing in for the internet.

Downloaders exercise their genuine HTTP paths (404s, concurrent fetches,
truncated bodies) against it without any network access.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature fixed by http.server
        logger.debug("%s - %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    # the default listen backlog of 5 drops connections under a downloader's 16+ threads
    request_queue_size = 128
    daemon_threads = True


class LoopbackServer:
    """Serve `root_dir` over HTTP; use as a context manager or call start()/stop().

    `port` is a preference: if it is taken, a free port is chosen instead.
    """

    def __init__(self, root_dir: str | os.PathLike, port: int = 0, host: str = "127.0.0.1") -> None:
        self.root_dir = Path(root_dir)
        self.host = host
        self.preferred_port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server is not running")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _bind(self, port: int) -> ThreadingHTTPServer:
        handler = functools.partial(_QuietHandler, directory=str(self.root_dir))
        server = _Server((self.host, port), handler)
        return server

    def start(self) -> LoopbackServer:
        if self._server is not None:
            return self
        if not self.root_dir.is_dir():
            raise FileNotFoundError(f"cannot serve missing folder {self.root_dir}")
        try:
            self._server = self._bind(self.preferred_port)
        except OSError as exc:
            if self.preferred_port == 0:
                raise
            logger.info("port %d unavailable (%s); using a free port", self.preferred_port, exc)
            self._server = self._bind(0)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"loopback-{self.port}", daemon=True,
        )
        self._thread.start()
        logger.info("serving %s at %s", self.root_dir, self.base_url)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        logger.info("stopped loopback server for %s", self.root_dir)
        self._server, self._thread = None, None

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None,
    ) -> None:
        self.stop()
