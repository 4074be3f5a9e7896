"""edgefleet's on-device part: the bundle format it trusts, and (later) the serving agent.

Imports here stay light: the device install has onnxruntime, numpy, paho-mqtt, prometheus-client,
cryptography and typer, and never torch.
"""

from agent.errors import EdgefleetError

__all__ = ["EdgefleetError"]
__version__ = "0.1.0"
