"""Transport floor for the agent benchmark: a Unix-socket server that reads one message of
`request` bytes and answers `answer` bytes (the same sizes as the agent's), doing no work. With
answer == request it is a plain echo. Thread per connection, blocking sockets, like the agent.

With MODEL_DIR (a store's version directory: model.onnx and its manifest.json), it is the
least a Python server does per single-row request instead: each message is a one-row binary
PREDICT frame whose row is run through the model the way the agent does (agent.engine
`Engine.predict_one`, an IO binding), the score written into the answer. No checks, no
scoring rules, no metrics, no log: what is left of the agent's work when all of that is gone,
so the bench can show how much of the gap to the floor Python itself takes.

    python bench/echo_server.py SOCKET REQUEST_BYTES ANSWER_BYTES [MODEL_DIR]
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path

_ROW = 24 + 8  # a PREDICT frame's header (agent.protocol.HEADER_SIZE) and die id


def _handle(conn: socket.socket, request: int, answer: int,
            work: Callable[[bytearray], Callable[[], None]] | None) -> None:
    buf = bytearray(max(request, answer, 1 << 16))
    view = memoryview(buf)
    run = work(buf) if work is not None else None
    with conn:
        while True:
            got = 0
            while got < request:
                n = conn.recv_into(view[got:request])
                if not n:
                    return
                got += n
            if run is not None:
                run()
            conn.sendall(view[:answer])


def _scorer(model_dir: Path, answer: int) -> Callable[[bytearray], Callable[[], None]]:
    """For a connection's buffer: the call that scores the frame in it and writes the score
    into the answer's last 4 bytes."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from agent.engine import Engine
    from agent.manifest import parse_manifest_bytes

    manifest = parse_manifest_bytes((model_dir / "manifest.json").read_bytes(), "manifest.json")
    engine = Engine(model_dir / "model.onnx", manifest)
    engine.warm_up()
    n, pack = manifest.input.n_features, struct.Struct("<f").pack_into

    def for_buffer(buf: bytearray) -> Callable[[], None]:
        row = np.frombuffer(buf, np.float32, n, _ROW)

        def run() -> None:
            pack(buf, answer - 4, engine.predict_one(row).score[0])

        return run

    return for_buffer


def main() -> None:
    path, request, answer = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    work = _scorer(Path(sys.argv[4]), answer) if len(sys.argv) > 4 else None
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(64)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_handle, args=(conn, request, answer, work), daemon=True).start()


if __name__ == "__main__":
    main()
