"""Signed checkpoints: with `signature:`, only files signed with the model's key (OpenSSF model-signing) serve.

Key pairs are made here with `cryptography`; files are signed with model-signing's Python API and, as a
training job would, with its `model_signing` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import Project, colours_yaml, free_port, sha256, wait_until
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from s3 import MotoServer, uri
from tinynet import colour_state_dict

from reloader.caches import CheckpointCache
from reloader.checkpoints import Candidate, hash_open_file, load_checkpoint, open_checkpoint, scan
from reloader.config import WatchConfig, load_config
from reloader.errors import CheckpointIncomplete, CheckpointRejected, ConfigError
from reloader.events import EventBus
from reloader.policy import FileStatus, Judge, plan
from reloader.signing import UNSIGNED, SignatureCheck, SignatureWait, sig_identity, signature_path
from reloader.source import Listing, LocalFolder

SETTLE_S = 1.0  # how long a checkpoint waits for its .sig here: long enough to see it wait, short enough to test
WATCH = f"watch:\n  settle_ms: {SETTLE_S * 1000:.0f}\n"
SIGNED = "    signature:\n      public_key: keys/release.pub\n"
CLI = Path(sys.executable).with_name("model_signing")


def make_keys(folder: Path, name: str, curve: ec.EllipticCurve | None = None) -> tuple[Path, Path]:
    """An EC key pair in PEM (P-256 unless told): (private, public)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(curve or ec.SECP256R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def sign(path: Path, private_key: Path) -> Path:
    """Sign one file with model-signing's Python API; the signature lands beside it as `<file>.sig`."""
    import model_signing.signing

    model_signing.signing.Config().use_elliptic_key_signer(private_key=private_key).sign(path, signature_path(path))
    return signature_path(path)


def sign_cli(path: Path, private_key: Path) -> Path:
    """As a training job signs: the `model_signing` command line."""
    sig = signature_path(path)
    subprocess.run(
        [str(CLI), "sign", "key", "--private_key", str(private_key), "--signature", str(sig), str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return sig


@pytest.fixture
def keys(project: Project) -> tuple[Path, Path]:
    """The release key pair, its public half where the config names it (keys/release.pub)."""
    return make_keys(project.root / "keys", "release")


def drop(project: Project, staged: Path, *, sig_first: bool = True) -> Path:
    """Move a staged checkpoint and its .sig into the watched folder (renames, as a careful job does)."""
    target = project.checkpoints / staged.name
    moves = [(signature_path(staged), signature_path(target)), (staged, target)]
    for src, dst in moves if sig_first else moves[::-1]:
        os.replace(src, dst)
    return target


def reason_of(daemon, path: Path) -> str:
    return daemon.file_status(path)["reason"]


def event_for(daemon, path: Path, result: str) -> dict:
    return next(e for e in daemon.status()["events"] if e.get("file") == str(path) and e["result"] == result)


# -- the daemon, end to end ------------------------------------------------------------------------


def test_signed_checkpoints_go_live_in_either_order_and_the_signature_is_checked_first(project, keys, start_daemon):
    private, _ = keys
    v1 = project.stage("colours-v1.pt")
    sign_cli(v1, private)  # the real command line, as a training job runs it
    drop(project, v1)
    project.write_config(colours_yaml(watch=WATCH, extra_model=SIGNED))
    daemon = start_daemon(project.config)

    status = daemon.wait_live(project.checkpoints / "colours-v1.pt")
    checks = status["live"]["report"]["checks"]
    assert [c["name"] for c in checks] == ["signature", "load", "structure", "finite", "warmup"]
    assert checks[0]["passed"] and checks[0]["detail"].startswith("signed with release.pub; sha256 ")

    # The .sig first, then the file: judged as soon as the file lands.
    v2 = project.stage("colours-v2.pt", colour_state_dict(scale=5.0))
    sign(v2, private)
    daemon.wait_live(drop(project, v2, sig_first=True))

    # The file first, then its .sig: it waits (incomplete) and is judged when the .sig lands.
    v3 = project.stage("colours-v3.pt", colour_state_dict(scale=6.0))
    sign(v3, private)
    target = drop(project, v3, sig_first=False)
    daemon.wait_live(target)
    assert daemon.predict("blue").json()["version"] == 3
    assert "rejected" not in {e["result"] for e in daemon.status()["events"]}  # not after a timeout: when the .sig came


def test_an_unsigned_file_waits_then_is_rejected_unsigned_and_goes_live_when_its_sig_lands_later(
    project, keys, start_daemon
):
    private, _ = keys
    v1 = project.stage("colours-v1.pt")
    sign(v1, private)
    drop(project, v1)
    project.write_config(colours_yaml(watch=WATCH, extra_model=SIGNED))
    daemon = start_daemon(project.config)
    daemon.wait_live(project.checkpoints / "colours-v1.pt")

    v2 = project.stage("colours-v2.pt", colour_state_dict(scale=5.0))
    sign(v2, private)
    late_sig = signature_path(v2).rename(project.root / "colours-v2.pt.sig.later")
    target = project.checkpoints / "colours-v2.pt"
    os.replace(v2, target)

    waiting = daemon.wait_file(target, "incomplete")
    assert waiting["reason"] == "signature: waiting for colours-v2.pt.sig"
    rejected = daemon.wait_file(target, "rejected")  # after waiting for its .sig (incomplete, above)
    assert rejected["reason"] == "signature: no colours-v2.pt.sig beside the file"
    event = event_for(daemon, target, "rejected")
    assert event["reason"] == rejected["reason"]
    assert set(event["timings_ms"]) == {"signature", "total"}  # rejected before a byte was parsed
    assert daemon.predict("red").json()["version"] == 1

    os.replace(late_sig, signature_path(target))  # the .sig lands after the rejection: it still counts
    daemon.wait_live(target)
    assert daemon.predict("red").json()["sha256"] == sha256(target)


def test_wrongly_signed_files_are_rejected_each_with_its_reason_while_the_signed_one_serves(
    project, keys, start_daemon
):
    private, _ = keys
    other, _ = make_keys(project.root / "elsewhere", "other")
    v1 = project.stage("colours-v1.pt")
    sign(v1, private)
    drop(project, v1)
    project.write_config(colours_yaml(watch=WATCH, extra_model=SIGNED))
    daemon = start_daemon(project.config)
    live = daemon.wait_live(project.checkpoints / "colours-v1.pt")["live"]["sha256"]

    v2 = project.stage("colours-v2.pt", colour_state_dict(scale=5.0))
    sign(v2, other)  # signed with another key
    v3 = project.stage("colours-v3.pt", colour_state_dict(scale=6.0))
    sign(v3, private)
    torch.save(colour_state_dict(scale=9.0), v3)  # changed after signing
    v4 = project.stage("colours-v4.pt", colour_state_dict(scale=7.0))
    signature_path(v4).write_bytes(os.urandom(900))  # a garbage .sig
    v5 = project.stage("colours-v5.pt", colour_state_dict(scale=8.0))
    signature_path(v5).write_text(json.dumps({"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json"}))
    v6 = project.root / "staging" / "colours-v6.pt"  # a signed old epoch, renamed to outrank the others
    v6.write_bytes((project.checkpoints / "colours-v1.pt").read_bytes())
    signature_path(v6).write_bytes(signature_path(project.checkpoints / "colours-v1.pt").read_bytes())
    hashes = {path.name: sha256(path) for path in (v3,)}
    for staged in (v2, v3, v4, v5, v6):
        drop(project, staged)

    folder = project.checkpoints
    expected = {
        "colours-v2.pt": "signature: colours-v2.pt.sig was signed with another key than release.pub",
        "colours-v3.pt": "signature: the file changed after it was signed: sha256 " + hashes["colours-v3.pt"][:12],
        "colours-v4.pt": "signature: colours-v4.pt.sig is not a model-signing signature: ",
        "colours-v5.pt": "signature: colours-v5.pt.sig is not a model-signing signature: ",
        "colours-v6.pt": "signature: colours-v6.pt.sig signs a file named 'colours-v1.pt', not 'colours-v6.pt'",
    }
    for name, reason in expected.items():
        status = daemon.wait_file(folder / name, "rejected")
        assert status["reason"].startswith(reason), (name, status["reason"])
        event = event_for(daemon, folder / name, "rejected")
        assert event["reason"] == status["reason"]
        assert "load" not in event["timings_ms"], name  # nothing of a badly signed file was parsed
    assert daemon.status()["live"]["sha256"] == live
    assert daemon.predict("green").json()["version"] == 1


def test_without_signature_in_the_config_no_sig_is_needed_and_none_is_read(project, start_daemon):
    project.save("colours-v1.pt")
    signature_path(project.checkpoints / "colours-v1.pt").write_bytes(b"garbage that would fail any check")
    daemon = start_daemon(project.config)

    status = daemon.wait_live(project.checkpoints / "colours-v1.pt")
    assert [c["name"] for c in status["live"]["report"]["checks"]][0] == "load"
    assert all(c.sig == "" for c in scan(project.checkpoints))


def test_a_signed_object_in_a_bucket_goes_live_and_an_unsigned_one_when_its_sig_is_uploaded(
    project, keys, tmp_path, start_daemon
):
    private, _ = keys
    moto = MotoServer(free_port(), tmp_path / "moto.log")
    moto.start()
    try:
        v1 = project.stage("colours-v1.pt")
        moto.upload(v1)
        moto.upload(sign(v1, private))
        v2 = project.stage("colours-v2.pt", colour_state_dict(scale=5.0))
        sig2 = sign(v2, private)
        moto.upload(v2)
        config = colours_yaml(watch="watch:\n  poll_interval: 0.2\n  settle_ms: 500\n", extra_model=SIGNED)
        config = config.replace("checkpoints: checkpoints/colours", f"checkpoints: {uri()}")
        project.write_config(config + f"cache_dir: {project.root / 'cache'}\n")
        daemon = start_daemon(project.config, env=moto.env())

        def entry(name: str, status: str) -> dict | None:
            found = next((f for f in daemon.status()["files"] if f["path"] == uri(name)), None)
            return found if found is not None and found["status"] == status else None

        wait_until(lambda: daemon.live_sha() == sha256(v1), what="the signed object to serve")
        rejected = wait_until(lambda: entry("colours-v2.pt", "rejected"), what="the unsigned object's rejection")
        assert rejected["reason"] == "signature: no colours-v2.pt.sig beside the file"
        assert daemon.status()["live"]["report"]["checks"][0]["name"] == "signature"

        moto.upload(sig2)
        wait_until(lambda: daemon.live_sha() == sha256(v2), what="the object to serve once its .sig is uploaded")
        assert (project.root / "cache" / "colours" / "colours-v2.pt.sig").read_bytes() == sig2.read_bytes()
    finally:
        moto.stop()


# -- the config ------------------------------------------------------------------------------------


def test_the_public_key_resolves_against_the_config_folder_and_its_content_is_part_of_the_definition(project, keys):
    _, public = keys
    project.write_config(colours_yaml(extra_model=SIGNED))
    spec = load_config(project.config).models["colours"].signature
    assert spec is not None and spec.public_key == public
    make_keys(project.root / "keys", "release")  # a new key at the same path: a new model definition
    assert load_config(project.config).models["colours"].signature != spec


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, "cannot be read: No such file or directory"),
        (b"not a key at all\n", "is not a PEM elliptic-curve public key"),
        ("rsa", "is not a PEM elliptic-curve public key"),
        ("private", "is not a PEM elliptic-curve public key"),
    ],
)
def test_a_public_key_that_is_missing_or_not_one_is_a_config_error_naming_it(project, content, error):
    key = project.root / "keys" / "release.pub"
    key.parent.mkdir()
    if content == "rsa":
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        content = rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    elif content == "private":
        content = make_keys(project.root / "elsewhere", "x")[0].read_bytes()
    if content is not None:
        key.write_bytes(content)
    project.write_config(colours_yaml(extra_model=SIGNED))

    with pytest.raises(ConfigError) as caught:
        load_config(project.config)
    assert f"models.colours.signature: public key '{key}' {error}" in str(caught.value)


def test_a_signature_without_a_public_key_is_one_config_error(project):
    project.write_config(colours_yaml(extra_model="    signature: {}\n"))
    with pytest.raises(ConfigError) as caught:
        load_config(project.config)
    assert str(caught.value).endswith(
        "models.colours.signature: public_key is required: the path of the PEM public key to verify with"
    )


# -- signing.py ------------------------------------------------------------------------------------


@pytest.fixture
def check(project: Project, keys: tuple[Path, Path]) -> SignatureCheck:
    project.write_config(colours_yaml(extra_model=SIGNED))
    spec = load_config(project.config).models["colours"].signature
    assert spec is not None
    return SignatureCheck("colours", spec)


def verified(check: SignatureCheck, path: Path) -> str:
    signed = check.verify(path)
    opened = open_checkpoint(path)
    try:
        return check.match(signed, path, opened.sha256, opened.changing)
    finally:
        opened.close()


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()])
def test_the_check_accepts_what_the_library_and_its_cli_sign_and_agrees_with_the_library(project, curve):
    import model_signing.verifying

    private, public = make_keys(project.root / "keys", "release", curve)
    project.write_config(colours_yaml(extra_model=SIGNED))
    spec = load_config(project.config).models["colours"].signature
    assert spec is not None
    check = SignatureCheck("colours", spec)
    by_api, by_cli = project.stage("colours-v1.pt"), project.stage("colours-v2.pt", colour_state_dict(scale=5.0))
    sign(by_api, private)
    sign_cli(by_cli, private)
    for path in (by_api, by_cli):
        assert verified(check, path) == f"signed with release.pub; sha256 {sha256(path)[:12]} as signed"
        # The library's own verification of the same pair agrees.
        model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public).verify(path, signature_path(path))


def test_the_check_refuses_folders_shards_other_hashes_and_oversized_sigs(project, check, keys):
    import model_signing.hashing
    import model_signing.signing

    private, _ = keys
    folder = project.root / "model"
    folder.mkdir()
    torch.save(colour_state_dict(), folder / "colours-v1.pt")
    path = project.stage("colours-v1.pt")

    def signed_with(hashing: model_signing.hashing.Config, target: Path) -> None:
        config = model_signing.signing.Config().use_elliptic_key_signer(private_key=private)
        config.set_hashing_config(hashing).sign(target, signature_path(path))

    signed_with(model_signing.hashing.Config(), folder)
    with pytest.raises(CheckpointRejected, match="signs a folder or shards \\(files of 1 item"):
        check.verify(path)
    signed_with(model_signing.hashing.Config().use_shard_serialization(), path)
    with pytest.raises(CheckpointRejected, match="signs a folder or shards \\(shards serialization\\)"):
        check.verify(path)
    signed_with(model_signing.hashing.Config().use_file_serialization(hashing_algorithm="blake2"), path)
    with pytest.raises(CheckpointRejected, match="was hashed with blake2b; sign with sha256"):
        check.verify(path)
    signature_path(path).write_bytes(b" " * (2 << 20))
    with pytest.raises(CheckpointRejected, match="is over 1048576 bytes"):
        check.verify(path)
    signature_path(path).unlink()
    signature_path(path).symlink_to(folder / "colours-v1.pt")
    with pytest.raises(CheckpointRejected, match="cannot read colours-v1.pt.sig: a symbolic link"):
        check.verify(path)


def test_a_forged_payload_with_the_right_key_hint_does_not_verify(project, check, keys):
    import base64

    private, _ = keys
    path = project.stage("colours-v1.pt")
    sig = sign(path, private)
    bundle = json.loads(sig.read_text())
    payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    payload["subject"][0]["name"] = "colours-v9.pt"  # the signed bytes change; the signature stays
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    sig.write_text(json.dumps(bundle))
    with pytest.raises(CheckpointRejected, match="does not verify with release.pub: signed with another key"):
        check.verify(path)


def test_a_file_swapped_after_verification_is_not_what_loads(project, check, keys):
    """The load parses through the descriptor that was hashed and compared: a rename over the path after
    that is not what it reads, and the load is retried (incomplete), never passed with other bytes; so is a
    rewrite in place before the parse ends, even with its size and mtime set back."""
    private, _ = keys
    path = project.stage("colours-v1.pt")
    sign(path, private)
    signed = check.verify(path)
    opened = open_checkpoint(path)
    check.match(signed, path, opened.sha256, opened.changing)
    evil = project.stage("evil.pt", colour_state_dict(permute=(1, 0, 2)))
    os.replace(evil, path)  # swapped by rename between the check and the load
    opened.fh.seek(0)
    assert hash_open_file(opened.fh) == signed.sha256 != sha256(path)  # the descriptor reads the signed bytes
    with pytest.raises(CheckpointIncomplete, match="changed while it was read"):  # unlinked: its ctime moved
        load_checkpoint(path, opened=opened)
    assert opened.fh.closed

    path = project.stage("colours-v2.pt")
    sign(path, private)
    signed = check.verify(path)
    opened = open_checkpoint(path)
    check.match(signed, path, opened.sha256, opened.changing)
    with open(path, "r+b") as fh:  # rewritten in place: same size and mtime set back, and still caught
        fh.seek(-1, os.SEEK_END)
        fh.write(b"\0")
    os.utime(path, ns=(opened.before.st_atime_ns, opened.before.st_mtime_ns))
    with pytest.raises(CheckpointIncomplete):
        load_checkpoint(path, opened=opened)


def test_a_mismatch_while_the_file_is_still_changing_is_incomplete_not_rejected(project, check, keys):
    private, _ = keys
    path = project.stage("colours-v1.pt")
    sign(path, private)
    signed = check.verify(path)
    opened = open_checkpoint(path)
    opened.close()
    with pytest.raises(CheckpointIncomplete, match="still being written"):
        check.match(signed, path, "0" * 64, lambda: True)
    with pytest.raises(CheckpointRejected, match="changed after it was signed: sha256 000000000000, signed"):
        check.match(signed, path, "0" * 64, lambda: False)


def test_the_sig_identity_changes_when_a_sig_lands_changes_or_goes(tmp_path):
    path = tmp_path / "colours-v1.pt"
    path.write_bytes(b"x")
    assert sig_identity(path) == UNSIGNED
    signature_path(path).write_bytes(b"one")
    first = sig_identity(path)
    assert first != UNSIGNED
    signature_path(path).write_bytes(b"other")
    assert sig_identity(path) not in (first, UNSIGNED)
    signature_path(path).unlink()
    signature_path(path).mkdir()
    assert sig_identity(path) == UNSIGNED  # not a regular file


def candidate(version: int, sig: str, *, inode: int = 1) -> Candidate:
    return Candidate(version, 0, Path(f"/ckpt/v{version}.pt"), 100, inode, sig=sig)


def test_the_wait_for_a_sig_runs_from_when_the_file_settled_and_starts_again_when_it_changes():
    wait = SignatureWait()
    unsigned, signed = candidate(2, UNSIGNED), candidate(1, "7:100:5")
    arriving = frozenset({unsigned.path})
    assert wait.hold([unsigned, signed], arriving, 0.0, 1.0) == {} and wait.next_due() is None  # still written
    assert wait.hold([unsigned, signed], frozenset(), 10.0, 1.0) == {unsigned.path: "signature: waiting for v2.pt.sig"}
    assert wait.next_due() == 11.0
    assert unsigned.path in wait.hold([unsigned], frozenset(), 10.5, 1.0)
    assert wait.hold([unsigned], frozenset(), 11.0, 1.0) == {} and wait.next_due() is None  # judged now
    assert wait.hold([unsigned], frozenset(), 20.0, 1.0) == {}  # and not held again
    rewritten = candidate(2, UNSIGNED, inode=9)
    assert rewritten.path in wait.hold([rewritten], frozenset(), 30.0, 1.0)  # a new file waits anew
    assert wait.hold([], frozenset(), 30.5, 1.0) == {} and wait.next_due() is None


def test_a_local_folder_holds_a_file_for_its_sig_only_where_signatures_are_required(project):
    clock = [100.0]
    folder = LocalFolder("colours", project.checkpoints, WatchConfig(settle_ms=500), EventBus(), lambda: clock[0])
    path = project.save("colours-v1.pt")
    assert folder.listing(clock[0]).arriving == frozenset()  # without signatures: exactly as before
    held = folder.listing(clock[0], signed=True)
    assert held.arriving == {path} and held.waiting == {path: "signature: waiting for colours-v1.pt.sig"}
    assert folder.next_due() == 100.5
    clock[0] = 100.5
    assert folder.listing(clock[0], signed=True).arriving == frozenset()  # the gate judges it (unsigned) now

    from reloader.settle import FileEvent

    sig = signature_path(path)
    sig.write_bytes(b"")
    folder.file_event(sig, FileEvent.CREATED)
    folder.file_event(sig, FileEvent.WRITTEN)
    listing = folder.listing(clock[0], signed=True)
    assert listing.arriving == {path} and listing.waiting == {}  # its .sig is being written
    (cand,) = listing.candidates
    assert cand.sig == sig_identity(path) != UNSIGNED
    folder.file_event(sig, FileEvent.CLOSED)
    assert folder.listing(clock[0], signed=True).arriving == frozenset()
    assert folder.unchanged(cand)
    sig.write_bytes(b"changed")
    assert not folder.unchanged(cand)


def test_a_rejection_by_the_signature_check_does_not_outlive_its_sig_and_others_do():
    cache = CheckpointCache()
    unsigned = candidate(2, UNSIGNED)
    cache.remember(unsigned, "sha-2")
    cache.reject("sha-2", "signature: no v2.pt.sig beside the file")
    decision = plan(Listing((unsigned,), frozenset(), None), None, "latest", cache.known({}))
    assert decision.files[0][1:] == (FileStatus.REJECTED, "signature: no v2.pt.sig beside the file")

    signed = candidate(2, "3:1400:7")  # its .sig landed: same content, judged again
    cache.remember(signed, "sha-2")
    assert plan(Listing((signed,), frozenset(), None), None, "latest", cache.known({})) == Judge(signed, "sha-2")

    cache.reject("sha-2", "warmup: red.png: expected 'red', got 'green'")  # a verdict on the content itself
    resigned = candidate(2, "4:1400:8")
    cache.remember(resigned, "sha-2")
    decision = plan(Listing((resigned,), frozenset(), None), None, "latest", cache.known({}))
    assert decision.files[0][1] is FileStatus.REJECTED
    cache.keep_only([])
    assert cache.known({}).unsigned == {} and cache.known({}).rejected == {}


def test_a_file_that_settles_during_a_pass_keeps_its_deadline_until_a_listing_takes_it(project):
    """A .sig and its file land in one burst: the pass that judges one file looks at `arriving` again, and a
    file that settled meanwhile must still bring a pass (it used to be forgotten there, and wait forever)."""
    from reloader.settle import CREATED_GRACE_S, FileEvent

    clock = [0.0]
    folder = LocalFolder("colours", project.checkpoints, WatchConfig(), EventBus(), lambda: clock[0])
    path = project.save("colours-v1.pt")
    folder.file_event(path, FileEvent.CREATED)
    assert folder.listing(0.0).arriving == {path}
    clock[0] = 1.0
    assert folder.arriving(1.0) == frozenset()  # the look in the middle of a pass
    assert folder.next_due() == CREATED_GRACE_S  # still due: the worker runs another pass
    assert folder.listing(1.0).arriving == frozenset() and folder.next_due() is None
