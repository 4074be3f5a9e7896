"""A WAN link between a site and the centre, for the site tests: a TCP relay on its own port
that forwards to the central broker, and that the test can cut (every connection through it is
reset and new ones are refused, as when a site's line drops) and restore (same port)."""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.broker_fixtures import free_port


class WanLink:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host, self.port = "127.0.0.1", free_port()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.connections = 0  # accepted so far (each bridge (re)connect is one)

    def start(self) -> WanLink:
        srv = socket.create_server((self.host, self.port))  # SO_REUSEADDR: same port again
        self._listener = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()
        return self

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not srv:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._socks += [client, upstream]
                self.connections += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Reset every connection and refuse new ones until `restore`."""
        with self._lock:
            srv, self._listener = self._listener, None
            socks, self._socks = self._socks, []
        if srv is not None:  # shutdown wakes the accept() blocked on it (Linux), then close
            with contextlib.suppress(OSError):
                srv.shutdown(socket.SHUT_RDWR)
            srv.close()
        for s in socks:  # shutdown wakes the pumps blocked in recv; both ends see the close
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self.start()

    def stop(self) -> None:
        self.cut()
