"""An in-process agent with a prediction log and a label desk, for the tests of
agent/predlog.py, agent/labels.py, agent/datafeed.py and fleet/collect.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.labels import LabelConfig, LabelDesk
from agent.predlog import PredictionLog, PredLogConfig, plug_in
from agent.server import AgentServer
from tests.agent_support import Model, running_agent


@contextlib.contextmanager
def logged_agent(model: Model, directory: Path, *, drop: Path | None = None,
                 **config: Any) -> Iterator[tuple[AgentServer, PredictionLog]]:
    """`running_agent(model)` whose answers go to a log in `directory` (`config`: the
    PredLogConfig fields; the free-space floor is off), labels joined, drop dir polled at once."""
    config.setdefault("min_free_bytes", 0)
    with running_agent(model) as server:
        plog = PredictionLog(PredLogConfig(directory=directory, **config), server.runtime)
        plog.labels = LabelDesk(LabelConfig(drop_dir=drop, poll_interval_s=0.0), plog.dir)
        plug_in(server, plog)
        plog.start()
        try:
            yield server, plog
        finally:
            plog.stop()
