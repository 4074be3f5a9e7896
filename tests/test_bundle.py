"""Bundle verification: every way a bundle can be wrong is refused with its own error."""

from __future__ import annotations

import io
import json
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agent.bundle as bundle_module
from agent.bundle import (
    BundleError,
    CorruptArchive,
    DigestMismatch,
    Downgrade,
    Expired,
    Incompatible,
    LimitExceeded,
    Limits,
    ManifestError,
    MissingFile,
    SignatureError,
    UnexpectedFile,
    UnsafeArchive,
    unpack_bundle,
    verify_bundle,
)
from agent.keys import Keyring, generate_keypair, revoke_key, trust_key
from agent.manifest import format_time
from tests.conftest import examples


def _members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path, "r:") as tf:
        return [(m, tf.extractfile(m).read() if m.isreg() else b"") for m in tf.getmembers()]


def _rewrite(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            info = tarfile.TarInfo(info.name) if isinstance(info, str) else info
            if info.isreg():
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
        end = tf.offset
    path.write_bytes(buf.getvalue()[: end + 1024])  # end marker only, like the bundle writer


def _add(path: Path, info: tarfile.TarInfo, data: bytes = b"") -> None:
    _rewrite(path, [*_members(path), (info, data)])


def _reg(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def test_valid_bundle_verifies_and_unpacks(make_bundle, signer, tmp_path):
    path, written = make_bundle()
    m = verify_bundle(path, signer.keyring)
    assert (m.name, m.version, m.sequence, m.signer) == ("test-model", "1.0.0", 1, signer.key_id)
    assert m.files == written.files
    staging = tmp_path / "staging"
    staging.mkdir()
    unpack_bundle(path, m, staging)
    assert sorted(p.name for p in staging.iterdir()) == [
        "manifest.json", "manifest.sig", "model.onnx"
    ]
    assert (staging / "manifest.json").read_bytes() == m.signed_bytes


def test_tampered_model_byte_is_a_digest_mismatch(make_bundle, signer):
    path, m = make_bundle()
    data = bytearray(path.read_bytes())
    offset = data.index(b"onnx-model-bytes")
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch, match=rf"model.onnx: sha256 expected {m.model_digest}"):
        verify_bundle(path, signer.keyring)


def test_tampered_manifest_breaks_the_signature(make_bundle, signer):
    path, _ = make_bundle()
    members = _members(path)
    manifest = json.loads(members[0][1])
    manifest["decision"]["threshold"] = 1e9  # make every die pass
    members[0] = (members[0][0], json.dumps(manifest, sort_keys=True).encode())
    _rewrite(path, members)
    with pytest.raises(SignatureError, match="signature does not match manifest.json"):
        verify_bundle(path, signer.keyring)


def test_signature_by_unknown_key(make_bundle, signer, tmp_path):
    stranger = generate_keypair(tmp_path / "stranger", "release")
    path, _ = make_bundle(key_path=stranger.private_path)
    with pytest.raises(SignatureError, match=rf"key {stranger.key_id} is not in keyring"):
        verify_bundle(path, signer.keyring)


def test_signature_by_revoked_key(make_bundle, signer):
    path, _ = make_bundle()
    revoke_key(signer.keyring_dir, signer.key_id)
    with pytest.raises(SignatureError, match="revoked"):
        verify_bundle(path, Keyring.load(signer.keyring_dir))


def test_signature_by_fleet_key_is_refused_for_bundles(make_bundle, tmp_path):
    fleet = generate_keypair(tmp_path / "f", "fleet")
    ring = tmp_path / "ring2"
    trust_key(ring, fleet.public_path, "fleet")
    path, _ = make_bundle(key_path=fleet.private_path)
    with pytest.raises(SignatureError, match="trusted for role 'fleet', not for 'release'"):
        verify_bundle(path, Keyring.load(ring))


def test_truncated_archive(make_bundle, signer):
    path, _ = make_bundle()
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"onnx-model-bytes") + 100])
    with pytest.raises(CorruptArchive, match="truncated"):
        verify_bundle(path, signer.keyring)


@pytest.mark.parametrize(
    ("name", "message"),
    [("../evil.onnx", "escapes the bundle"), ("/etc/evil", "absolute path")],
)
def test_member_paths_that_escape_are_refused(make_bundle, signer, name, message):
    path, _ = make_bundle()
    _add(path, _reg(name), b"x")
    with pytest.raises(UnsafeArchive, match=message):
        verify_bundle(path, signer.keyring)


@pytest.mark.parametrize(
    ("kind", "word"), [(tarfile.SYMTYPE, "symlink"), (tarfile.LNKTYPE, "hard link"),
                       (tarfile.CHRTYPE, "device"), (tarfile.DIRTYPE, "directory")]
)
def test_links_and_devices_are_refused(make_bundle, signer, kind, word):
    path, _ = make_bundle()
    info = _reg("extra")
    info.type, info.linkname = kind, "/etc/passwd"
    _add(path, info)
    with pytest.raises(UnsafeArchive, match=word):
        verify_bundle(path, signer.keyring)


def test_oversized_member(make_bundle, signer):
    path, _ = make_bundle(files={"model.onnx": b"m" * 5000})
    with pytest.raises(LimitExceeded, match="'model.onnx' is 5000 bytes, limit 4096"):
        verify_bundle(path, signer.keyring, limits=Limits(max_member_bytes=4096))


def test_oversized_bundle_and_too_many_members(make_bundle, signer):
    path, _ = make_bundle()
    with pytest.raises(LimitExceeded, match="bundle is"):
        verify_bundle(path, signer.keyring, limits=Limits(max_bundle_bytes=1000))
    with pytest.raises(LimitExceeded, match="more than 2 members"):
        verify_bundle(path, signer.keyring, limits=Limits(max_members=2))
    with pytest.raises(LimitExceeded, match="manifest.json is"):
        verify_bundle(path, signer.keyring, limits=Limits(max_manifest_bytes=100))


def test_duplicate_member(make_bundle, signer):
    path, _ = make_bundle()
    _add(path, _reg("model.onnx"), b"second copy")
    with pytest.raises(UnsafeArchive, match="'model.onnx' appears twice"):
        verify_bundle(path, signer.keyring)


def test_listed_file_missing(make_bundle, signer):
    path, _ = make_bundle(files={"model.onnx": b"m", "reference.json": b"{}"})
    _rewrite(path, [(i, d) for i, d in _members(path) if i.name != "reference.json"])
    with pytest.raises(MissingFile, match="reference.json is listed in the manifest"):
        verify_bundle(path, signer.keyring)


def test_extra_file_not_listed(make_bundle, signer):
    path, _ = make_bundle()
    _add(path, _reg("payload.sh"), b"rm -rf /")
    with pytest.raises(UnexpectedFile, match="'payload.sh' is not listed"):
        verify_bundle(path, signer.keyring)


def test_expired(make_bundle, signer):
    created = datetime(2026, 1, 1, tzinfo=UTC)
    path, _ = make_bundle(
        created=format_time(created), expires=format_time(created + timedelta(days=1))
    )
    assert verify_bundle(path, signer.keyring, now=created + timedelta(hours=1))
    with pytest.raises(Expired, match="expired at 2026-01-02T00:00:00Z"):
        verify_bundle(path, signer.keyring, now=created + timedelta(days=2))


def test_older_sequence_than_allowed(make_bundle, signer):
    path, _ = make_bundle(model={"name": "m", "version": "2", "sequence": 7})
    assert verify_bundle(path, signer.keyring, min_sequence=7).sequence == 7
    with pytest.raises(Downgrade, match="sequence 7 is below the minimum allowed 8"):
        verify_bundle(path, signer.keyring, min_sequence=8)


def test_future_format_version(make_bundle, signer):
    path, _ = make_bundle(format_version=2)
    with pytest.raises(Incompatible, match="format_version 2 is newer"):
        verify_bundle(path, signer.keyring)


def test_manifest_schema_errors_name_the_field(make_bundle):
    with pytest.raises(ManifestError, match=r"field decision.threshold: expected a number"):
        make_bundle(decision={"threshold": "high", "confidence_scale": 1.0, "top_k": 1})
    with pytest.raises(ManifestError, match=r"input.feature_names: expected 16 strings"):
        make_bundle(input={"n_features": 16, "feature_names": ["a"], "dtype": "float32"})
    with pytest.raises(ManifestError, match="unknown field 'treshold'"):
        make_bundle(treshold=1.0)


def test_gzip_is_not_a_bundle(signer, tmp_path):
    import gzip

    path = tmp_path / "x.efb"
    path.write_bytes(gzip.compress(b"hello" * 100))
    with pytest.raises(CorruptArchive, match="not an uncompressed tar"):
        verify_bundle(path, signer.keyring)


def test_unpack_detects_a_bundle_swapped_after_verification(make_bundle, signer, tmp_path):
    path, _ = make_bundle()
    m = verify_bundle(path, signer.keyring)
    other, _ = make_bundle(files={"model.onnx": b"another model"})
    path.write_bytes(other.read_bytes())
    staging = tmp_path / "st"
    staging.mkdir()
    with pytest.raises(DigestMismatch, match="changed since verification"):
        unpack_bundle(path, m, staging)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One valid bundle and its keyring, shared by the property tests."""
    tmp = tmp_path_factory.mktemp("prop")
    from agent.bundle import write_bundle
    from agent.keys import load_private_key
    from tests.conftest import manifest_fields

    pair = generate_keypair(tmp / "k", "release")
    trust_key(tmp / "ring", pair.public_path, "release")
    path = tmp / "b.efb"
    write_bundle(path, manifest_fields(), {"model.onnx": bytes(range(256)) * 8},
                 load_private_key(pair.private_path))
    return _Pristine(path.read_bytes(), Keyring.load(tmp / "ring"), tmp)


class _Pristine(tuple):
    """(bundle bytes, keyring, tmp dir) with a short repr for hypothesis' failure reports."""

    def __new__(cls, *items):
        return super().__new__(cls, items)

    def __repr__(self) -> str:
        return f"<valid bundle of {len(self[0])} bytes>"


@settings(
    max_examples=examples(300),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_random_corruption_is_always_rejected_with_a_bundle_error(pristine, data):
    original, ring, tmp = pristine
    corrupted = bytearray(original)
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, len(corrupted) - 1))
            corrupted[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        corrupted = corrupted[: data.draw(st.integers(0, len(corrupted) - 1))]
    else:
        i = data.draw(st.integers(0, len(corrupted)))
        corrupted[i:i] = data.draw(st.binary(min_size=1, max_size=600))
    if bytes(corrupted) == original:
        return
    path = tmp / "corrupt.efb"
    path.write_bytes(bytes(corrupted))
    with pytest.raises(BundleError):
        verify_bundle(path, ring)


def test_one_written_rule_for_revoked_keys_and_installed_models():
    """docs/operations.md, docs/fleet-protocol.md and the docstrings of agent/install.py and
    agent/bundle.py state the same rule, word for word (the tests of agent/install.py and of
    the device link check that the code follows it)."""
    import agent.install
    from tests.conftest import REPO

    def rule(text: str) -> str:
        start = text.index("A model serves only while")
        end = text.index("(`untrusted-key`).", start)
        return " ".join(text[start:end].split())

    texts = {"install.py": agent.install.__doc__, "bundle.py": bundle_module.__doc__,
             "operations.md": (REPO / "docs" / "operations.md").read_text(),
             "fleet-protocol.md": (REPO / "docs" / "fleet-protocol.md").read_text()}
    rules = {name: rule(text or "") for name, text in texts.items()}
    assert len(set(rules.values())) == 1, rules
    assert "a rollback to it is refused" in rules["install.py"]


def test_bundle_digest_from_the_parsed_manifest_or_the_stored_files(make_bundle, signer,
                                                                    tmp_path):
    """The digest of an unpacked version is the bundle's sha256 whether the caller hands in the
    version's parsed manifest (a swap) or not, and unpacking returns the same (computed from
    the bytes it wrote, kept for the swap); a manifest of other bytes is not trusted for the
    file list."""
    import dataclasses
    import hashlib

    from agent.digest import bundle_digest

    path, _ = make_bundle()
    m = verify_bundle(path, signer.keyring)
    staging = tmp_path / "v"
    staging.mkdir()
    unpacked = unpack_bundle(path, m, staging)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert unpacked == want
    # another version's manifest: its file list would name a file this version lacks
    other = dataclasses.replace(m, files={**m.files, "extra.bin": m.files["model.onnx"]},
                                signed_bytes=b"{}")
    assert bundle_digest(staging) == bundle_digest(staging, m) == want
    assert bundle_digest(staging, other) == want
