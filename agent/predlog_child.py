"""The prediction log's writer process: `python -m agent.predlog_child CONFIG_JSON`.

Spawned by the agent (agent/predlog_proc.py), never by hand. It reads the serving process's tap
stream (agent/predlog_tap.py) on stdin, writes the log, the capture and the labels
(agent/predlog.py's `PredictionLog` and its writer thread, agent/labels.py's `LabelDesk`) and
answers FLUSH and SNAPSHOT messages on stdout (u32 length, then JSON {"id", "snapshot"}). One
thread reads and writes (`serve`): no lock, no GIL to share, one malloc arena.

Its life is the agent's: it ignores SIGINT and SIGTERM (a terminal's Ctrl-C or a service
manager's stop reach the whole process group; the agent's own stop then hands over the rest of
its answers and closes the pipe), and at end of input - the agent stopped, or was killed - it
writes every answer it has read and exits. It holds `<log dir>/writer.lock` (flock) while it
writes, so a writer still finishing for a killed agent and the next agent's writer never
append to the same rings at once. It runs at the lowest CPU priority, SCHED_IDLE (and nice 10;
`lower_priority`): on a busy core the kernel hands the CPU to a waking serving thread at once,
and no GIL is shared any more.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import signal
import sys
import time
from pathlib import Path

import orjson

from agent.predlog import PredictionLog, PredLogConfig
from agent.predlog_tap import FLUSH, U32

NICE = 10
_PASS_MESSAGES = 4096  # a pass as soon as this many answers are queued
_PASS_BYTES = 4 << 20  # or this many bytes

log = logging.getLogger("edgefleet.agent")


def lock_directory(directory: Path) -> int:
    """Hold `<directory>/writer.lock` (blocks while another writer holds it); the fd."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / "writer.lock", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.warning("prediction log: waiting for the previous writer of %s to finish", directory)
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def serve(config: dict, stdin: int = 0, stdout: int = 1) -> None:
    """Write the log of the tap stream read from `stdin` until it ends; replies to `stdout`.

    One thread: it reads what the pipe holds, queues it (`PredictionLog.feed`) and writes a pass
    (`PredictionLog.flush`) every `flush_interval_s`, or sooner once `_PASS_MESSAGES` or
    `_PASS_BYTES` are queued. While it writes it does not read, so a writer that falls behind
    fills the pipe and the agent's tap drops and counts (its caps): the writer's own queue stays
    small. Memory a big pass freed goes back to the OS once passes stay small (malloc_trim).
    """
    from agent.labels import LabelConfig, LabelDesk
    from agent.memory import Trimmer, limit_arenas

    limit_arenas(1)
    log_cfg = PredLogConfig(**{**config["log"], "directory": Path(config["log"]["directory"])})
    lock = lock_directory(log_cfg.directory)
    plog = PredictionLog(log_cfg)
    labels = config.get("labels")
    if labels is not None:
        drop = labels.get("drop_dir")
        plog.labels = LabelDesk(LabelConfig(**{**labels, "drop_dir": drop and Path(drop)}),
                                plog.dir)
    plog.trimmer = Trimmer(idle_s=1.0)
    plog.trimmer.start()

    def control(kind: int, request: int) -> None:
        if kind == FLUSH:
            plog.flush()
        reply = orjson.dumps({"id": request, "snapshot": plog.snapshot(models=False)})
        data = memoryview(U32.pack(len(reply)) + reply)
        while data:
            data = data[os.write(stdout, data):]

    interval = log_cfg.flush_interval_s
    next_pass = time.monotonic() + interval
    try:
        while True:
            wait = next_pass - time.monotonic()
            if wait <= 0 or plog.queued() >= _PASS_MESSAGES or plog.queued_bytes() >= _PASS_BYTES:
                plog.flush()
                next_pass = time.monotonic() + interval
                continue
            if not select.select([stdin], [], [], wait)[0]:
                continue
            data = os.read(stdin, 1 << 20)
            if not data:
                break  # the agent stopped, or died
            plog.feed(data, control)
    except BrokenPipeError:  # the agent is gone: nobody waits for a reply
        pass
    finally:
        plog.stop()  # writes everything read
        plog.trimmer.stop()
        os.close(lock)


def lower_priority(idle: bool) -> None:
    """Nice 10, and with `idle` the SCHED_IDLE policy: the writer then runs only on CPU time
    no other task of the box wants, and a waking serving thread takes the CPU from it at once.
    On one CPU shared with the tester and the agent, a writer at nice 10 alone still took
    enough of it to cost a binary answer ~7% of its p99 (docs/operations.md, "What it
    costs"). The price: on a box whose CPUs are all busy the writer falls behind, and past the
    tap's caps answers are dropped from the log and counted - the answers are never slowed.
    A process cannot take back a priority it gave up without CAP_SYS_NICE, so this is set
    once, for the writer's life (`PREDLOG_WRITER_IDLE=0` keeps nice 10 only)."""
    with contextlib.suppress(OSError):
        os.nice(NICE)
    if idle:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as e:
            log.warning("prediction log: writer stays at nice %d (SCHED_IDLE refused: %s)",
                        NICE, e)


def main(argv: list[str]) -> int:
    config = orjson.loads(argv[1])
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=config.get("log_level", "WARNING").upper(), stream=sys.stderr,
                        format="%(asctime)s predlog-writer %(levelname)s %(message)s")
    logging.Formatter.converter = time.gmtime
    lower_priority(config["log"].get("writer_idle", True))
    out = os.dup(1)  # replies only: nothing else may print into them
    os.dup2(2, 1)
    serve(config, 0, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
