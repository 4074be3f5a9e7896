"""The broker configuration the project ships, rendered for a deployment: `mosquitto.conf`
(plain or TLS with client certificates) and the per-device ACL, from the templates in broker/.

    render_broker_config(out_dir, port=8883, tls=True, ca_file=..., cert_file=..., key_file=...)
    render_acl(prefix="edgefleet", controller="edgefleet-controller")
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from agent.errors import EdgefleetError
from agent.wire import Topics

REPO_BROKER_DIR = Path(__file__).resolve().parents[1] / "broker"

__all__ = ["REPO_BROKER_DIR", "render_acl", "render_broker_config"]


def _render(template: str, values: dict[str, Any]) -> str:
    out = template
    for key, value in values.items():
        out = out.replace("{{" + key + "}}", str(value))
    missing = re.search(r"\{\{[A-Z_]+\}\}", out)
    if missing:
        raise EdgefleetError(f"broker template still has {missing.group()} after rendering")
    return out


def render_acl(prefix: str = "edgefleet", controller: str = "edgefleet-controller",
               template_dir: Path = REPO_BROKER_DIR) -> str:
    """The per-device ACL (broker/acl.template) for a topic prefix and controller name."""
    Topics(prefix)
    return _render((template_dir / "acl.template").read_text(),
                   {"PREFIX": prefix, "CONTROLLER": controller})


def render_broker_config(out_dir: Path, *, port: int, tls: bool, bind: str = "127.0.0.1",
                         ca_file: Path | None = None, cert_file: Path | None = None,
                         key_file: Path | None = None, prefix: str = "edgefleet",
                         controller: str = "edgefleet-controller", user: str = "mosquitto",
                         template_dir: Path = REPO_BROKER_DIR) -> Path:
    """Write `mosquitto.conf` (and, with TLS, `acl`) into `out_dir` from the shipped templates
    (broker/mosquitto.conf, broker/mosquitto-tls.conf); returns the config path. The broker's
    persistence lives in `out_dir/data`. `user` is who mosquitto runs as when started as root
    (it must be able to read the key files)."""
    out_dir = Path(out_dir).resolve()
    data = out_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {"PORT": port, "BIND": bind, "DATA_DIR": data, "USER": user}
    if tls:
        if not (ca_file and cert_file and key_file):
            raise EdgefleetError("a TLS broker needs ca_file, cert_file and key_file")
        acl = out_dir / "acl"
        acl.write_text(render_acl(prefix, controller, template_dir))
        values.update(ACL_FILE=acl, CA_FILE=Path(ca_file).resolve(),
                      CERT_FILE=Path(cert_file).resolve(), KEY_FILE=Path(key_file).resolve())
    name = "mosquitto-tls.conf" if tls else "mosquitto.conf"
    conf = out_dir / "mosquitto.conf"
    conf.write_text(_render((template_dir / name).read_text(), values))
    return conf

