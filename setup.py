"""The one thing pyproject.toml cannot say yet without an experimental table: the agent's C
extension, its JSON number reader (agent/_jsonfloats.c; why it exists: agent/jsonfast.py).
Plain C against CPython's API, no other library. A checkout nobody built still works: the agent
falls back to the json module's slower parse, and `edgefleet agent info` says which one runs."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "agent._jsonfloats", ["agent/_jsonfloats.c"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
)])
