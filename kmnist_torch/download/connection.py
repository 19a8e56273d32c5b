"""The connections of one download attempt: an opener that follows redirects (never from https
to plain http) and hands every socket it opens to a :class:`Watchdog`, which shuts them all when
the attempt's deadline passes, so no read can block past it however slowly a server drips."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
import urllib.error
import urllib.request


class NoDowngradeRedirect(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but never from https to plain http."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if req.full_url.lower().startswith("https:") and newurl.lower().startswith("http:"):
            raise urllib.error.HTTPError(
                req.full_url, code, f"refused redirect from https to insecure {newurl}",
                headers, fp,
            )  # fmt: skip
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class Watchdog:
    """Shuts down every socket of one attempt when its deadline passes, so a read blocked in the
    status line, the headers or the body returns at once however slowly the server drips."""

    def __init__(self, seconds: float) -> None:
        self.fired = False
        self.seconds = seconds
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._start = time.monotonic()
        self._end = self._start + seconds
        self._arm(seconds)

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(max(0.0, seconds), self.fire)
        self._timer.daemon = True
        self._timer.start()

    def tighten(self, seconds: float) -> None:
        """Bring the deadline forward to ``seconds`` from now (never push it back)."""
        end = time.monotonic() + seconds
        if end < self._end:
            self._end, self.seconds = end, end - self._start
            self._arm(seconds)

    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return self.fired or time.monotonic() >= self._end

    def register(self, sock: socket.socket) -> None:
        """Watch ``sock``: shut at once if the deadline has passed, else when it does."""
        with self._lock:
            self._socks.append(sock)
            if self.fired:
                self._shut(sock)

    def fire(self) -> None:
        """Shut every socket now (the timer calls it at the deadline)."""
        with self._lock:
            self.fired = True
            for sock in self._socks:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def cancel(self) -> None:
        """Stop the timer (the attempt is over)."""
        if self._timer is not None:
            self._timer.cancel()


def opener(watchdog: Watchdog) -> urllib.request.OpenerDirector:
    """An opener whose connections register their sockets with ``watchdog``."""

    def watched(base):
        class Conn(base):
            def connect(self):
                super().connect()
                watchdog.register(self.sock)

        return Conn

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(watched(http.client.HTTPConnection), req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(watched(http.client.HTTPSConnection), req,
                                context=self._context)  # fmt: skip

    return urllib.request.build_opener(Http(), Https(), NoDowngradeRedirect())
