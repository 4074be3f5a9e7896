"""`edgefleet keys ...` and `edgefleet bundle ...`: make keys, manage a keyring, sign and verify
model bundles. These live with the agent because the device is the part that must trust them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from agent.bundle import read_manifest_unverified, verify_bundle, write_bundle
from agent.cli_output import WRITE_FORMATS, check, emit, read_output, write_output
from agent.errors import UsageError
from agent.keys import (
    PASSPHRASE_ENV,
    ROLES,
    Keyring,
    generate_keypair,
    load_private_key,
    revoke_key,
    trust_key,
)
from agent.manifest import format_time

keys_app = typer.Typer(
    help="Create Ed25519 keys and manage the keyring a device trusts.", no_args_is_help=True
)
bundle_app = typer.Typer(
    help="Sign, verify and inspect model bundles (*.efb).", no_args_is_help=True
)


def _passphrase(env_name: str) -> bytes | None:
    value = os.environ.get(env_name)
    return value.encode() if value else None


@keys_app.command("generate")
def keys_generate(
    out: Path = typer.Option(..., "--out", help="Directory to write NAME.key and NAME.pub into."),
    name: str = typer.Option("release", "--name", help="File name stem, e.g. release or fleet."),
    passphrase_env: str = typer.Option(
        PASSPHRASE_ENV, help="Environment variable holding a passphrase to encrypt the key with."
    ),
    output: str = write_output(),
) -> None:
    """Generate an Ed25519 key pair: NAME.key (PEM, mode 0600) and NAME.pub.

    Examples:

      edgefleet keys generate --out keys --name release

      EDGEFLEET_KEY_PASSPHRASE=... edgefleet keys generate --out keys --name fleet -o json
    """
    check(output, WRITE_FORMATS)
    pair = generate_keypair(out, name, _passphrase(passphrase_env))
    emit(output, {"key_id": pair.key_id, "private_key": str(pair.private_path),
                  "public_key": str(pair.public_path)},
         text=lambda: f"key id {pair.key_id}: wrote {pair.private_path} and {pair.public_path}")


@keys_app.command("trust")
def keys_trust(
    public_key: Path = typer.Argument(..., help="PEM public key file (NAME.pub)."),
    keyring: Path = typer.Option(..., "--keyring", help="Keyring directory (created if needed)."),
    role: str = typer.Option(..., "--role", help="release (signs bundles) or fleet (commands)."),
    output: str = write_output(),
) -> None:
    """Trust a public key for one role. Rotate by trusting the new key before revoking the old.

    Examples:

      edgefleet keys trust keys/release.pub --keyring keyring --role release

      edgefleet keys trust keys/fleet.pub --keyring keyring --role fleet -o json
    """
    check(output, WRITE_FORMATS)
    if role not in ROLES:
        raise UsageError(f"--role must be one of {', '.join(ROLES)}, not {role!r}")
    kid = trust_key(keyring, public_key, role)
    emit(output, {"key_id": kid, "role": role, "keyring": str(keyring), "trusted": True},
         text=lambda: f"trusted key {kid} for role {role} in {keyring}")


@keys_app.command("revoke")
def keys_revoke(
    key_id: str = typer.Argument(..., help="Key id to revoke (16 hex digits)."),
    keyring: Path = typer.Option(..., "--keyring", help="Keyring directory."),
    output: str = write_output(),
) -> None:
    """Add a key id to the keyring's revocation list; revoked keys are refused for every role.

    Examples:

      edgefleet keys revoke 0123456789abcdef --keyring keyring

      edgefleet keys revoke 0123456789abcdef --keyring keyring -o json
    """
    check(output, WRITE_FORMATS)
    revoke_key(keyring, key_id)
    emit(output, {"key_id": key_id, "keyring": str(keyring), "revoked": True},
         text=lambda: f"revoked key {key_id} in {keyring}")


@keys_app.command("list")
def keys_list(keyring: Path = typer.Option(..., "--keyring", help="Keyring directory."),
              output: str = read_output()) -> None:
    """List trusted keys by role, and which of them are revoked.

    Examples:

      edgefleet keys list --keyring /etc/edgefleet/keyring

      edgefleet keys list --keyring keyring -o json
    """
    check(output)
    ring = Keyring.load(keyring)
    keys = [{"key_id": kid, "role": role,
             "state": "revoked" if kid in ring.revoked else "trusted"}
            for role in ROLES for kid in sorted(ring.trusted[role])]
    emit(output, keys,
         text=lambda: "\n".join(f"{k['key_id']}  {k['role']:8s} {k['state']}" for k in keys),
         names=lambda: [f"key/{k['key_id']}" for k in keys])


@bundle_app.command("sign")
def bundle_sign(
    source: Path = typer.Argument(
        ..., help="Directory with manifest.json (without files/signer) and the files to include."
    ),
    key: Path = typer.Option(..., "--key", help="Release private key (PEM, mode 0600)."),
    out: Path = typer.Option(..., "--out", help="Bundle file to write (*.efb)."),
    output: str = write_output(),
) -> None:
    """Sign a directory into a bundle: every file next to manifest.json is pinned by SHA-256.

    Examples:

      edgefleet bundle sign build/bundle-src --key keys/release.key --out model.efb

      edgefleet bundle sign src --key keys/release.key --out model.efb -o json
    """
    check(output, WRITE_FORMATS)
    manifest_path = source / "manifest.json"
    if not manifest_path.is_file():
        raise UsageError(f"{manifest_path} not found", hint="SOURCE must hold manifest.json")
    try:
        fields = json.loads(manifest_path.read_text())
    except ValueError as e:
        raise UsageError(f"{manifest_path}: not valid JSON: {e}") from None
    files = {p.name: p for p in sorted(source.iterdir()) if p.is_file() and p != manifest_path}
    manifest = write_bundle(out, fields, files, load_private_key(key))
    emit(output, {"bundle": str(out), "sha256": _sha256(out), "name": manifest.name,
                  "version": manifest.version, "sequence": manifest.sequence,
                  "files": len(manifest.files), "signer": manifest.signer},
         text=lambda: f"signed {out}: {manifest.name} {manifest.version} sequence "
                      f"{manifest.sequence}, {len(manifest.files)} files, signer "
                      f"{manifest.signer}")


@bundle_app.command("verify")
def bundle_verify(
    bundle: Path = typer.Argument(..., help="Bundle file (*.efb)."),
    keyring: Path = typer.Option(..., "--keyring", help="Keyring directory of trusted keys."),
    min_sequence: int = typer.Option(None, help="Refuse bundles with a lower sequence."),
    output: str = read_output(),
) -> None:
    """Verify a bundle exactly as a device does; exit 1 with the reason if it is refused.
    The bundle's sha256 is the digest devices report and rollouts name.

    Examples:

      edgefleet bundle verify model.efb --keyring /etc/edgefleet/keyring

      edgefleet bundle verify model.efb --keyring keyring --min-sequence 3 -o json
    """
    check(output)
    m = verify_bundle(bundle, Keyring.load(keyring), min_sequence=min_sequence)
    digest = _sha256(bundle)
    emit(output, {"bundle": str(bundle), "verified": True, "sha256": digest, "name": m.name,
                  "version": m.version, "sequence": m.sequence, "signer": m.signer,
                  "model_sha256": m.model_digest},
         text=lambda: f"OK {bundle}: {m.name} {m.version} sequence {m.sequence}, signer "
                      f"{m.signer}, bundle sha256:{digest[:16]}...",
         wide=lambda: f"OK {bundle}: {m.name} {m.version} sequence {m.sequence}, signer "
                      f"{m.signer}, bundle sha256:{digest}, model sha256:{m.model_digest}",
         names=lambda: [f"sha256:{digest}"])


@bundle_app.command("inspect")
def bundle_inspect(
    bundle: Path = typer.Argument(..., help="Bundle file (*.efb)."),
    keyring: Path = typer.Option(None, "--keyring", help="Verify against this keyring first."),
    output: str = read_output(),
) -> None:
    """Show a bundle's manifest. Without --keyring nothing is verified, and it says so.

    Examples:

      edgefleet bundle inspect model.efb --keyring keyring

      edgefleet bundle inspect model.efb -o yaml
    """
    check(output)
    if keyring is not None:
        m, verified = verify_bundle(bundle, Keyring.load(keyring)), "verified"
    else:
        m, verified = read_manifest_unverified(bundle), "NOT verified (pass --keyring)"
    emit(output, {"verified": keyring is not None, "sha256": _sha256(bundle),
                  "manifest": m.raw},
         text=lambda: _inspect_text(bundle, m, verified),
         names=lambda: [f"sha256:{_sha256(bundle)}"])


def _inspect_text(bundle: Path, m, verified: str) -> str:
    rows = [
        ("bundle sha256", _sha256(bundle)),
        ("model", f"{m.name} {m.version}"),
        ("sequence", str(m.sequence)),
        ("signature", f"{verified}, signer {m.signer}"),
        ("created", format_time(m.created)),
        ("expires", format_time(m.expires) if m.expires else "never"),
        ("input", f"{m.input.n_features} x {m.input.dtype}"),
        ("threshold", f"{m.threshold:.6g} (top_k {m.top_k})"),
        ("fallback", f"{len(m.rules)} rules"),
        ("golden", f"{len(m.golden)} vectors, abs_tol {m.golden_abs_tol}, "
                   f"rel_tol {m.golden_rel_tol}"),
        ("drift ref", "yes" if m.drift_edges else "no"),
    ]
    rows += [(f"file {n}", f"{e.size} bytes sha256 {e.sha256[:16]}...")
             for n, e in sorted(m.files.items())]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _sha256(path: Path) -> str:
    """The file's SHA-256: for a bundle, the digest devices report and rollouts name."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
