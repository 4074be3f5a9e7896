"""The `edgefleet` command: one CLI with a group per part (keys, bundle, optimize, agent, fleet)."""
