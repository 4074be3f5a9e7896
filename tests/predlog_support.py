"""An in-process agent with a prediction log and a label desk, for the tests of
agent/predlog.py, agent/labels.py, agent/datafeed.py and fleet/collect.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.labels import LabelConfig, LabelDesk
from agent.predlog import PredictionLog, PredLogConfig, plug_in
from agent.predlog_proc import WriterProcess
from agent.server import AgentServer
from tests.agent_support import Model, running_agent

# Where the log's writer runs: "process" as the agent runs it (agent/predlog_proc.py, a real
# writer process), "thread" in the test's own process (its counters and rings inspectable)
MODES = ("thread", "process")


@contextlib.contextmanager
def logged_agent(model: Model, directory: Path, *, drop: Path | None = None,
                 mode: str = "thread", label_grace_s: float = 0.0,
                 **config: Any) -> Iterator[tuple[AgentServer, Any]]:
    """`running_agent(model)` whose answers go to a log in `directory` (`config`: the
    PredLogConfig fields; the free-space floor is off), labels joined, drop dir polled at once.
    A dropped file's labels join at once unless `label_grace_s` (LabelConfig.unknown_grace_s).
    Yields the server and the log: a `PredictionLog` (mode "thread") or a `WriterProcess`
    ("process")."""
    config.setdefault("min_free_bytes", 0)
    labels = LabelConfig(drop_dir=drop, poll_interval_s=0.0, unknown_grace_s=label_grace_s)
    with running_agent(model) as server:
        if mode == "process":
            plog: Any = WriterProcess(PredLogConfig(directory=directory, **config),
                                      server.runtime, labels)
        else:
            plog = PredictionLog(PredLogConfig(directory=directory, **config), server.runtime)
            plog.labels = LabelDesk(labels, plog.dir)
        plug_in(server, plog)
        plog.start()
        try:
            yield server, plog
        finally:
            plog.stop()


def metric_value(text: str, name: str) -> float:
    """The value of sample `name` (with its labels, as exposed) in a metrics exposition; 0 if
    absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
