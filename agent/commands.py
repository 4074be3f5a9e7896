"""Signed fleet commands: the format, signing, and what a device checks before it obeys one.

The broker is not trusted. A command is accepted only if it was signed by a key the device's
keyring trusts for the `fleet` role (never a `release` key), names this device, is within its
validity window and has not been seen before. The wire form is an envelope whose `body` is the
command as a canonical JSON *string*, so the signature covers exact bytes and nothing is ever
re-serialized before checking (see docs/fleet-protocol.md):

    {"v": 1,
     "body": "{\"device_id\":\"box-001\",\"expires\":\"...\",\"id\":\"...\",...}",
     "sig": {"algorithm": "ed25519", "key_id": "<16 hex>", "signature": "<base64, 64 bytes>"}}

    signature = Ed25519(SIGNING_CONTEXT + body.encode("utf-8"))

`verify_command(payload, keyring, device_id=...)` checks, in this order, and raises one
`CommandError` subclass per failure, each with a stable `reason` code for the device's events:

 1. size          payload at most MAX_PAYLOAD bytes                       -> Malformed
 2. envelope      JSON object, v == 1, body a string                       -> Malformed
 3. signed        a `sig` object is present                                -> Unsigned
 4. key           sig.key_id trusted for role `fleet`, not revoked         -> UntrustedKey
 5. signature     Ed25519 over SIGNING_CONTEXT + body bytes                -> BadSignature
 6. schema        body parses strictly (types, names, ranges)              -> Malformed
 7. addressee     body.device_id == this device                            -> WrongDevice
 8. time          issued <= now + skew; now < expires;
                  expires - issued <= max lifetime                         -> NotYetValid, Expired
 9. replay        id never seen, issued after the replay floor             -> Replayed

Step 9 is `ReplayGuard.check`; the caller records the id (`ReplayGuard.record`, durable) before
it acts on the command, so the same command id runs at most once even across restarts, and
forgetting an id raises the replay floor, so no window reopens when the clock is set back.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import EdgefleetError
from agent.fsio import atomic_write
from agent.keys import Keyring, KeyringError, key_id, verify_signature
from agent.manifest import canonical_json, format_time, utc_now
from agent.wire import COMMAND_TYPES, INSTALL_TYPES, Reason

SIGNING_CONTEXT = b"edgefleet-command-v1\x00"
ENVELOPE_VERSION = 1
MAX_PAYLOAD = 16 * 1024
DEFAULT_MAX_SKEW = timedelta(minutes=5)
DEFAULT_MAX_LIFETIME = timedelta(days=30)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_DEVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_KID_RE = re.compile(r"^[0-9a-f]{16}$")
_BODY_KEYS = {"type", "id", "rollout_id", "device_id", "issued", "expires", "install"}
_INSTALL_KEYS = {"url", "sha256", "size", "sequence"}

__all__ = [
    "COMMAND_TYPES",
    "BadSignature",
    "Command",
    "CommandError",
    "Expired",
    "InstallSpec",
    "Malformed",
    "NotYetValid",
    "ReplayGuard",
    "Replayed",
    "Unsigned",
    "UntrustedKey",
    "WrongDevice",
    "sign_command",
    "valid_device_id",
    "verify_command",
]


class CommandError(EdgefleetError):
    """A command was refused. `reason` is a stable code for events; `command_id` is the id the
    payload *claims* (None if it could not be read) so the refusal can be correlated."""

    reason = Reason.REFUSED

    def __init__(self, message: str, *, command_id: str | None = None,
                 rollout_id: str | None = None) -> None:
        super().__init__(message)
        self.command_id = command_id
        self.rollout_id = rollout_id


class Malformed(CommandError):
    reason = Reason.MALFORMED


class Unsigned(CommandError):
    reason = Reason.UNSIGNED


class UntrustedKey(CommandError):
    reason = Reason.UNTRUSTED_KEY


class BadSignature(CommandError):
    reason = Reason.BAD_SIGNATURE


class WrongDevice(CommandError):
    reason = Reason.WRONG_DEVICE


class NotYetValid(CommandError):
    reason = Reason.NOT_YET_VALID


class Expired(CommandError):
    reason = Reason.EXPIRED


class Replayed(CommandError):
    reason = Reason.REPLAYED


def valid_device_id(device_id: str) -> bool:
    """1-64 chars of [A-Za-z0-9._-], starting alphanumeric: safe in MQTT topics (no `/`, `+`,
    `#`), file names and certificate common names."""
    return bool(_DEVICE_RE.match(device_id))


@dataclass(frozen=True)
class InstallSpec:
    url: str  # http:// or https:// URL of the bundle
    sha256: str  # of the whole .efb file, 64 lowercase hex
    size: int  # exact size of the .efb file in bytes; also the download cap
    sequence: int  # the bundle's model.sequence (checked against the manifest)


@dataclass(frozen=True)
class Command:
    type: str  # one of COMMAND_TYPES
    id: str
    rollout_id: str
    device_id: str
    issued: datetime
    expires: datetime
    install: InstallSpec | None = None

    def body(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": self.type, "id": self.id, "rollout_id": self.rollout_id,
            "device_id": self.device_id, "issued": format_time(self.issued),
            "expires": format_time(self.expires),
        }
        if self.install is not None:
            d["install"] = dict(self.install.__dict__)
        return d

    @classmethod
    def new(cls, type: str, device_id: str, *, id: str, rollout_id: str,
            ttl: timedelta = timedelta(hours=24), install: InstallSpec | None = None,
            now: datetime | None = None) -> Command:
        """A command issued now (whole seconds) and valid for `ttl`."""
        issued = (now or utc_now()).astimezone(UTC).replace(microsecond=0)
        cmd = cls(type, id, rollout_id, device_id, issued, issued + ttl, install)
        _parse_body(cmd.body(), id)  # refuse to sign what a device would refuse to parse
        return cmd


def sign_command(command: Command, private_key: Ed25519PrivateKey, *,
                 kid: str | None = None) -> bytes:
    """The MQTT payload for `command`, signed with a fleet key. `kid`: the key's id
    (`agent.keys.key_id` of its public key), for a signer that computes it once."""
    body = canonical_json(command.body())
    signature = private_key.sign(SIGNING_CONTEXT + body)
    return canonical_json({
        "v": ENVELOPE_VERSION,
        "body": body.decode("utf-8"),
        "sig": {"algorithm": "ed25519", "key_id": kid or key_id(private_key.public_key()),
                "signature": base64.b64encode(signature).decode("ascii")},
    })


def verify_command(
    payload: bytes,
    keyring: Keyring,
    *,
    device_id: str,
    now: datetime | None = None,
    max_skew: timedelta = DEFAULT_MAX_SKEW,
    max_lifetime: timedelta = DEFAULT_MAX_LIFETIME,
) -> Command:
    """Check steps 1-8 of the module docstring and return the command; raise `CommandError`.
    Replay (step 9) is `ReplayGuard.check`."""
    if len(payload) > MAX_PAYLOAD:
        raise Malformed(f"command payload is {len(payload)} bytes, limit {MAX_PAYLOAD}")
    try:
        env = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise Malformed(f"command payload is not UTF-8 JSON: {e}") from None
    if not isinstance(env, dict) or not isinstance(env.get("body"), str):
        raise Malformed("command envelope: expected an object with a string field 'body'")
    body_text: str = env["body"]
    claimed_id, claimed_rollout = _claimed_ids(body_text)
    ids = {"command_id": claimed_id, "rollout_id": claimed_rollout}
    if env.get("v") != ENVELOPE_VERSION:
        raise Malformed(f"command envelope: v expected {ENVELOPE_VERSION}, found "
                        f"{json.dumps(env.get('v'))}", **ids)
    sig = env.get("sig")
    if sig is None:
        raise Unsigned("command is not signed (no 'sig')", **ids)
    if not isinstance(sig, dict) or sig.get("algorithm") != "ed25519":
        raise Unsigned("command signature: expected algorithm 'ed25519'", **ids)
    kid, sig_b64 = sig.get("key_id"), sig.get("signature")
    if not isinstance(kid, str) or not _KID_RE.match(kid) or not isinstance(sig_b64, str):
        raise Unsigned("command signature: key_id or signature missing or malformed", **ids)
    try:
        public_key = keyring.public_key(kid, "fleet")
    except KeyringError as e:
        raise UntrustedKey(f"command signed by an untrusted key: {e}", **ids) from None
    try:
        signature = base64.b64decode(sig_b64, validate=True)
    except ValueError:
        raise BadSignature("command signature is not base64", **ids) from None
    if len(signature) != 64 or not verify_signature(
        public_key, signature, SIGNING_CONTEXT + body_text.encode("utf-8")
    ):
        raise BadSignature(f"command signature does not match its body for key {kid}", **ids)
    try:
        body = json.loads(body_text)
    except ValueError as e:  # signed but not JSON: a broken controller
        raise Malformed(f"signed command body is not JSON: {e}", **ids) from None
    cmd = _parse_body(body, claimed_id)
    ids = {"command_id": cmd.id, "rollout_id": cmd.rollout_id}
    if cmd.device_id != device_id:
        raise WrongDevice(
            f"command {cmd.id} is addressed to device {cmd.device_id!r}, this is {device_id!r}",
            **ids,
        )
    now = now or utc_now()
    if cmd.issued > now + max_skew:
        raise NotYetValid(
            f"command {cmd.id} issued {format_time(cmd.issued)}, in the future "
            f"(now {format_time(now)}, allowed skew {int(max_skew.total_seconds())} s)", **ids,
        )
    if now >= cmd.expires:
        raise Expired(
            f"command {cmd.id} expired at {format_time(cmd.expires)}, now {format_time(now)}",
            **ids,
        )
    if cmd.expires - cmd.issued > max_lifetime:
        raise Expired(
            f"command {cmd.id} is valid for {cmd.expires - cmd.issued}, longer than the "
            f"allowed {max_lifetime}", **ids,
        )
    return cmd


def _claimed_ids(body_text: str) -> tuple[str | None, str | None]:
    """Best-effort, untrusted: the id and rollout id a body claims, for refusal reports."""
    try:
        body = json.loads(body_text)
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    cid, rid = body.get("id"), body.get("rollout_id")
    return (cid if isinstance(cid, str) and _ID_RE.match(cid) else None,
            rid if isinstance(rid, str) and _ID_RE.match(rid) else None)


def _parse_body(body: Any, claimed_id: str | None) -> Command:
    def bad(field: str, expected: str, found: Any) -> Malformed:
        shown = json.dumps(found)[:80] if found is not _MISSING else "nothing"
        return Malformed(f"command field {field}: expected {expected}, found {shown}",
                         command_id=claimed_id)

    if not isinstance(body, dict):
        raise bad("(body)", "an object", body)
    unknown = sorted(set(body) - _BODY_KEYS)
    if unknown:
        raise bad(unknown[0], "no such field", body[unknown[0]])

    def text(obj: dict, key: str, regex: re.Pattern, what: str, path: str = "") -> str:
        v = obj.get(key, _MISSING)
        if not isinstance(v, str) or not regex.match(v):
            raise bad(path + key, what, v)
        return v

    def time(key: str) -> datetime:
        v = body.get(key, _MISSING)
        try:
            if not isinstance(v, str):
                raise ValueError
            t = datetime.fromisoformat(v.replace("Z", "+00:00"))
            if t.tzinfo is None:
                raise ValueError
        except ValueError:
            raise bad(key, "an RFC 3339 time with offset", v) from None
        return t.astimezone(UTC)

    ctype = body.get("type", _MISSING)
    if ctype not in COMMAND_TYPES:
        raise bad("type", " or ".join(COMMAND_TYPES), ctype)
    cid = text(body, "id", _ID_RE, "1-128 chars of [A-Za-z0-9._:-]")
    rid = text(body, "rollout_id", _ID_RE, "1-128 chars of [A-Za-z0-9._:-]")
    dev = text(body, "device_id", _DEVICE_RE, "a device id (1-64 chars of [A-Za-z0-9._-])")
    issued, expires = time("issued"), time("expires")
    if expires <= issued:
        raise bad("expires", f"a time after issued ({format_time(issued)})", body["expires"])
    spec = None
    if ctype in INSTALL_TYPES:
        inst = body.get("install", _MISSING)
        if not isinstance(inst, dict):
            raise bad("install", "an object", inst)
        unknown = sorted(set(inst) - _INSTALL_KEYS)
        if unknown:
            raise bad(f"install.{unknown[0]}", "no such field", inst[unknown[0]])
        url = inst.get("url", _MISSING)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")) \
                or len(url) > 2048:
            raise bad("install.url", "an http:// or https:// URL", url)
        sha = text(inst, "sha256", _SHA_RE, "64 lowercase hex", "install.")
        size, seq = inst.get("size", _MISSING), inst.get("sequence", _MISSING)
        if not _is_int(size) or size <= 0:
            raise bad("install.size", "an integer > 0", size)
        if not _is_int(seq) or seq < 0:
            raise bad("install.sequence", "an integer >= 0", seq)
        spec = InstallSpec(url, sha, size, seq)
    elif "install" in body:
        raise bad("install", f"nothing for a {ctype} command", body["install"])
    return Command(ctype, cid, rid, dev, issued, expires, spec)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Missing:
    pass


_MISSING = _Missing()


class ReplayGuard:
    """The command ids a device has accepted, on disk, bounded.

    An id is kept until its command expires by the device's clock, or until more than
    `capacity` are kept (then the oldest by issue time go). Whatever is forgotten, for either
    reason, raises the *floor* to its issue time: any command issued at or before the floor is
    refused as a possible replay. The floor only ever rises, and it is in the controller's time
    (issue times), not the device's: a device clock that jumps ahead forgets commands early,
    but when it is set back their windows stay closed. Nothing that was accepted can ever be
    accepted again. The file is replaced atomically on every `record`.

    The cost: a command issued before one that was forgotten, but delivered only after that,
    is refused too (`replayed`, "not after the replay floor"); the controller re-issues it.
    `clock` is the device's clock (injected in tests).
    """

    def __init__(self, path: Path, *, capacity: int = 1024,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.path = Path(path)
        self.capacity = capacity
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, float]] = {}  # id -> (issued, expires), unix time
        self._floor = float("-inf")
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return
        except ValueError as e:
            raise EdgefleetError(
                f"{self.path}: replay record is not valid JSON: {e}",
                hint="the file is replaced atomically; restore it or delete it to accept "
                     "commands issued after now only",
            ) from None
        self._floor = float(data["floor"]) if data.get("floor") is not None else float("-inf")
        self._seen = {k: (float(v[0]), float(v[1])) for k, v in data.get("seen", {}).items()}

    def check(self, cmd: Command) -> None:
        """Raise `Replayed` if `cmd` was accepted before or is older than the floor."""
        with self._lock:
            self._check(cmd)

    def _check(self, cmd: Command) -> None:
        ids = {"command_id": cmd.id, "rollout_id": cmd.rollout_id}
        if cmd.id in self._seen:
            raise Replayed(f"command {cmd.id} was already received", **ids)
        if cmd.issued.timestamp() <= self._floor:
            raise Replayed(
                f"command {cmd.id} issued {format_time(cmd.issued)}, not after the replay "
                "floor (older commands were forgotten)", **ids,
            )

    @property
    def floor(self) -> float:
        """Unix time (an issue time): commands issued at or before it are refused."""
        return self._floor

    def record(self, cmd: Command, *, now: datetime | None = None) -> None:
        """Check and remember `cmd` durably (raises `Replayed` like `check`)."""
        now_ts = (now or self.clock()).timestamp()
        with self._lock:
            self._check(cmd)
            self._seen[cmd.id] = (cmd.issued.timestamp(), cmd.expires.timestamp())
            forget = {k for k, (_, expires) in self._seen.items() if expires <= now_ts}
            by_age = sorted((kv for kv in self._seen.items() if kv[0] not in forget),
                            key=lambda kv: kv[1][0])
            forget.update(k for k, _ in by_age[: max(0, len(by_age) - self.capacity)])
            for k in forget:
                self._floor = max(self._floor, self._seen.pop(k)[0])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps({
                "floor": None if self._floor == float("-inf") else self._floor,
                "seen": {k: list(v) for k, v in self._seen.items()},
            }).encode())

    def __contains__(self, command_id: str) -> bool:
        with self._lock:
            return command_id in self._seen
