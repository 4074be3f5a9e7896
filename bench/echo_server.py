"""Transport floor for the agent benchmark: a Unix-socket server that reads one message of
`request` bytes and answers `answer` bytes (the same sizes as the agent's), doing no work. With
answer == request it is a plain echo. Thread per connection, blocking sockets, like the agent.

    python bench/echo_server.py SOCKET REQUEST_BYTES ANSWER_BYTES
"""

from __future__ import annotations

import os
import socket
import sys
import threading


def _handle(conn: socket.socket, request: int, answer: int) -> None:
    buf = bytearray(max(request, answer, 1 << 16))
    view = memoryview(buf)
    with conn:
        while True:
            got = 0
            while got < request:
                n = conn.recv_into(view[got:request])
                if not n:
                    return
                got += n
            conn.sendall(view[:answer])


def main() -> None:
    path, request, answer = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(64)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_handle, args=(conn, request, answer), daemon=True).start()


if __name__ == "__main__":
    main()
