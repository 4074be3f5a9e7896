"""The bundle digest of an installed version: the SHA-256 the fleet names a model by.

Its own module (re-exported by agent.link): the predictor computes it on every swap, in the
serving process, and importing agent.link there would pull in the MQTT client on the first
swap of an agent that has no fleet link.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

from agent.manifest import Manifest, loads_in_pieces


def bundle_digest(version_dir: Path, manifest: Manifest | None = None) -> str:
    """SHA-256 of the canonical bundle an installed version was unpacked from, rebuilt from the
    stored files (docs/bundle-format.md: the archive has exactly one encoding; bundles written
    by edgefleet are that encoding). It equals the `sha256` the install command named.

    `manifest`: the version's parsed manifest when the caller has it (a swap does): its file
    list is used when its bytes are the stored manifest.json's, so the swap does not parse
    200 kB of JSON again with the GIL held (issue 15). hashlib releases the GIL on the file
    contents, so what is left holds it for a few tar headers."""
    d = Path(version_dir)
    manifest_bytes = (d / "manifest.json").read_bytes()
    if manifest is not None and manifest.signed_bytes == manifest_bytes:
        names = sorted(manifest.files)
    else:
        # orjson in pieces: json.loads of a ~200 kB manifest held the GIL for 1-5 ms on every
        # fresh install, stalling answers on the serving loop (issue 15)
        names = sorted(loads_in_pieces(manifest_bytes)["files"])
    h = hashlib.sha256()
    for name in ["manifest.json", "manifest.sig", *names]:
        data = manifest_bytes if name == "manifest.json" else (d / name).read_bytes()
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime, info.uid, info.gid = len(data), 0o644, 0, 0, 0
        info.uname = info.gname = ""
        h.update(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
        h.update(data)
        h.update(b"\0" * (-len(data) % tarfile.BLOCKSIZE))
    h.update(b"\0" * (2 * tarfile.BLOCKSIZE))
    return h.hexdigest()
