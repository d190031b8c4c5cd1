"""Checkpoints from S3-compatible storage: moto's S3 server on loopback as the endpoint, boto3 as the trainer."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import Project, colours_yaml, free_port, sha256, wait_until
from s3 import BUCKET, PREFIX, MotoServer, uri
from test_metrics import Scrape
from tinynet import colour_state_dict

from reloader.bucket import BucketSource
from reloader.config import WatchConfig
from reloader.errors import ConfigError, FetchFailed
from reloader.events import CheckpointSeen, EventBus
from reloader.locations import S3Location
from reloader.settle import FileEvent

CACHE_KEEP = 2


@pytest.fixture
def moto(tmp_path: Path) -> Iterator[MotoServer]:
    """A stopped server: each test starts it when its story needs the endpoint up."""
    server = MotoServer(free_port(), tmp_path / "moto.log")
    yield server
    server.stop()


def bucket_yaml(project: Project, cache: Path | None = None) -> str:
    config = colours_yaml(watch="watch:\n  poll_interval: 0.2\n")
    config = config.replace("checkpoints: checkpoints/colours", f"checkpoints: {uri()}")
    return config + f"cache_dir: {cache or project.root / 'cache'}\ncache_keep: {CACHE_KEEP}\n"


def wait_live(daemon, path: Path) -> dict:
    """Until `path`'s object serves and the pass that swapped it has published its file list and error
    (the swap happens mid-pass: a status read between the two shows the new live beside the old list)."""
    daemon.wait_live(sha256(path))
    wait_until(lambda: (file_entry(daemon, path.name) or {}).get("status") == "live", what=f"{path.name} listed live")
    return daemon.status()


def file_entry(daemon, name: str) -> dict | None:
    return next((f for f in daemon.status()["files"] if f["path"] == uri(name)), None)


def cached(project: Project) -> list[str]:
    return sorted(p.name for p in (project.root / "cache" / "colours").iterdir() if not p.name.startswith("."))


def test_uploads_go_live_a_bad_overwrite_is_rejected_and_a_delete_falls_back(project, moto, start_daemon):
    moto.start()
    v1 = project.stage("colours-v1.pt")
    moto.upload(v1)
    project.write_config(bucket_yaml(project))
    daemon = start_daemon(project.config, env=moto.env())

    status = wait_live(daemon, v1)
    assert status["checkpoints"] == uri()
    assert status["live"]["path"] == uri("colours-v1.pt")
    answer = daemon.predict("red")
    assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] == "red"
    assert answer.headers["x-model-version"] == "1"
    assert answer.headers["x-model-sha256"] == sha256(v1)

    # Above boto3's 8 MB threshold upload_file goes multipart: the ETag is no MD5, and the bytes still check out.
    big = {"state_dict": colour_state_dict(scale=5.0), "optimizer": torch.zeros(3_000_000)}
    v2 = project.stage("colours-v2.pt", big)
    moto.upload(v2)
    assert "-" in moto.client().head_object(Bucket=BUCKET, Key=PREFIX + "colours-v2.pt")["ETag"]
    status = wait_live(daemon, v2)
    assert status["live"]["version"] == 2
    assert status["live"]["path"] == uri("colours-v2.pt")
    swap = next(e for e in status["events"] if e["result"] == "live")
    assert swap["file"] == uri("colours-v2.pt")

    # The live object overwritten with weights of the wrong shape: rejected; version 2 keeps serving.
    bad = project.stage("bad/colours-v2.pt", {"fc.weight": torch.zeros(7, 7)})
    moto.upload(bad, "colours-v2.pt")
    entry = wait_until(lambda: (f := file_entry(daemon, "colours-v2.pt")) and f["status"] == "rejected" and f)
    assert entry["sha256"] == sha256(bad)
    assert "structure" in entry["reason"]
    assert daemon.status()["live"]["sha256"] == sha256(v2)
    assert daemon.predict("green").json()["predictions"][0]["label"] == "green"

    # The object deleted: the newest valid remaining version takes over, as with a deleted file.
    moto.delete("colours-v2.pt")
    status = wait_live(daemon, v1)
    assert status["live"]["path"] == uri("colours-v1.pt")
    assert [f["path"] for f in status["files"]] == [uri("colours-v1.pt")]
    # The cache lost the deleted object's file and holds the live one.
    wait_until(lambda: cached(project) == ["colours-v1.pt"], what="the cache to drop the deleted object")


def use_endpoint(monkeypatch: pytest.MonkeyPatch, server: MotoServer) -> None:
    """The in-process source reads boto3's standard variables, as the daemon does."""
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)


def test_an_unchanged_object_is_downloaded_once_and_the_cache_stays_bounded(project, moto, tmp_path, monkeypatch):
    moto.start()
    use_endpoint(monkeypatch, moto)
    source = BucketSource("colours", S3Location.parse(uri()), WatchConfig(), tmp_path / "cache", CACHE_KEEP, EventBus())
    for version in range(1, 5):
        moto.upload(project.stage(f"colours-v{version}.pt", colour_state_dict(scale=float(version))))
    listing = source.listing(0.0)
    assert listing.error is None
    assert [c.version for c in listing.candidates] == [4, 3, 2, 1]
    for cand in listing.candidates:
        assert source.fetch(cand).read_bytes() == (project.root / "staging" / cand.path.name).read_bytes()
    first = {c.path: c.path.stat().st_ino for c in listing.candidates}
    again = source.listing(1.0)
    assert again.candidates == listing.candidates  # same ETag, size and LastModified
    assert all(source.unchanged(c) for c in again.candidates)
    for cand in again.candidates:
        assert source.fetch(cand).stat().st_ino == first[cand.path], "an unchanged object was downloaded again"

    # Bounded: the live file (v1 here, the oldest) stays, plus the newest others up to cache_keep.
    live = listing.candidates[-1].path
    source.keep(live)
    assert cached(project) == ["colours-v1.pt", "colours-v4.pt"]


def test_1500_keys_are_listed_across_pages_and_an_unfinished_multipart_upload_is_never_seen(
    project, moto, tmp_path, monkeypatch
):
    moto.start()
    client = moto.client()
    # S3 answers at most 1,000 keys per page: 1,500 objects take two pages.
    with ThreadPoolExecutor(8) as pool:
        keys = [f"{PREFIX}colours-v{i:04}.pt" for i in range(1, 1501)]
        list(pool.map(lambda key: client.put_object(Bucket=BUCKET, Key=key, Body=b"x"), keys))
    unfinished = PREFIX + "colours-v9999.pt"
    started = client.create_multipart_upload(Bucket=BUCKET, Key=unfinished)
    client.upload_part(Bucket=BUCKET, Key=unfinished, UploadId=started["UploadId"], PartNumber=1, Body=b"y" * 5_242_880)
    use_endpoint(monkeypatch, moto)
    seen: list[CheckpointSeen] = []
    bus = EventBus()
    bus.subscribe(lambda event: seen.append(event) if isinstance(event, CheckpointSeen) else None)
    source = BucketSource("colours", S3Location.parse(uri()), WatchConfig(), tmp_path / "cache", 3, bus)
    listing = source.listing(0.0)
    assert listing.error is None
    assert len(listing.candidates) == 1500
    assert listing.candidates[0].version == 1500 and listing.candidates[-1].version == 1
    assert all(c.version != 9999 for c in listing.candidates)
    assert len(seen) == 1500 and {e.how for e in seen} == {FileEvent.LISTED}
    assert seen[0].file.startswith(uri("colours-v"))


def test_the_endpoint_going_away_keeps_the_live_version_and_a_restart_serves_from_the_cache(
    project, moto, start_daemon
):
    moto.start()
    v1 = project.stage("colours-v1.pt")
    moto.upload(v1)
    project.write_config(bucket_yaml(project))
    daemon = start_daemon(project.config, env=moto.env())
    wait_live(daemon, v1)

    moto.stop()
    error = wait_until(lambda: daemon.status()["error"], what="the source error to show")
    assert error.startswith(f"cannot list {uri()}: cannot reach the endpoint")
    assert daemon.get("/healthz").status_code == 200
    assert daemon.get("/readyz").status_code == 200
    assert daemon.predict("blue").json()["predictions"][0]["label"] == "blue"
    assert Scrape(daemon).value("reloader_source_errors_total", model="colours") == 1

    # Back, with a new version: picked up without a restart (backoff is capped, so within seconds).
    moto.start()
    v2 = project.stage("colours-v2.pt", colour_state_dict(scale=6.0))
    moto.upload(v2)
    wait_live(daemon, v2)
    assert daemon.status()["error"] is None
    # One line when the source failed and one when it came back, however many listings failed between (a
    # listing between moto's start and its bucket's creation is another state, NoSuchBucket, with its own line).
    log = daemon.log()
    assert log.count("cannot list s3://models/colours/: cannot reach the endpoint") == 1, log
    assert log.count(f"{uri()} can be read again") == 1, log

    # Restarted while the endpoint is down: the newest valid version in the cache serves.
    daemon.stop()
    moto.stop()
    again = start_daemon(project.config, env=moto.env())
    status = again.status()
    assert status["live"]["sha256"] == sha256(v2)
    assert status["live"]["path"] == uri("colours-v2.pt")
    assert status["error"].startswith(f"cannot list {uri()}")
    assert again.predict("green").json()["predictions"][0]["label"] == "green"


def test_with_an_empty_cache_and_no_endpoint_the_model_waits_until_the_endpoint_answers(project, moto, start_daemon):
    project.write_config(bucket_yaml(project))
    daemon = start_daemon(project.config, env=moto.env(), ready=False)
    wait_until(lambda: daemon.status()["error"], what="the source error")
    assert daemon.get("/readyz").status_code == 503
    assert daemon.predict("red").status_code == 503

    moto.start()
    v1 = project.stage("colours-v1.pt")
    moto.upload(v1)
    wait_live(daemon, v1)
    assert daemon.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    ("override", "code", "hint"),
    [
        ("AWS_SECRET_ACCESS_KEY", "SignatureDoesNotMatch", "check AWS_SECRET_ACCESS_KEY"),
        ("AWS_ACCESS_KEY_ID", "InvalidAccessKeyId", "check AWS_ACCESS_KEY_ID"),
    ],
)
def test_wrong_credentials_give_a_clear_error(project, tmp_path, start_daemon, override, code, hint):
    server = MotoServer(free_port(), tmp_path / "moto-auth.log", auth=True)
    server.start()
    try:
        server.upload(project.stage("colours-v1.pt"))
        project.write_config(bucket_yaml(project))
        daemon = start_daemon(project.config, env=server.env(**{override: "AKIAWRONGWRONGWRONG0"}), ready=False)
        error = wait_until(lambda: daemon.status()["error"], what="the credentials error")
        assert error.startswith(f"cannot list {uri()}: {code} (HTTP 403): ") and error.endswith(hint), error
        assert daemon.get("/readyz").status_code == 503
        assert Scrape(daemon).value("reloader_source_errors_total", model="colours") == 1
    finally:
        server.stop()


def test_an_object_changed_after_its_listing_is_not_downloaded_and_leaves_nothing_behind(
    project, moto, tmp_path, monkeypatch
):
    moto.start()
    moto.upload(project.stage("colours-v1.pt"))
    use_endpoint(monkeypatch, moto)
    source = BucketSource("colours", S3Location.parse(uri()), WatchConfig(), tmp_path / "cache", 3, EventBus())
    (cand,) = source.listing(0.0).candidates
    moto.upload(project.stage("colours-v1.pt", colour_state_dict(scale=7.0)))  # changed after the listing
    with pytest.raises(FetchFailed, match="PreconditionFailed .*changed since it was listed"):
        source.fetch(cand)
    assert list((tmp_path / "cache" / "colours").iterdir()) == []
    assert not source.unchanged(cand)


@pytest.mark.parametrize("value", ["s3://Models/x/", "s3://a/x/", "s3:///x/"])
def test_a_bad_bucket_name_is_a_config_error(project, value):
    from reloader.config import load_config

    project.write_config(colours_yaml().replace("checkpoints: checkpoints/colours", f"checkpoints: {value}"))
    with pytest.raises(ConfigError, match="bucket name must be 3-63"):
        load_config(project.config)


def test_an_s3_location_names_its_objects():
    where = S3Location.parse("s3://models/shapes")
    assert (where.bucket, where.prefix) == ("models", "shapes/")
    assert where.uri("v1.pt") == "s3://models/shapes/v1.pt"
    assert S3Location.parse("s3://models").prefix == ""
    assert str(where) == "s3://models/shapes/"


def test_an_object_over_max_checkpoint_bytes_is_rejected_without_being_downloaded(project, moto, start_daemon):
    moto.start()
    v1 = project.stage("colours-v1.pt")
    moto.upload(v1)
    huge = project.stage("colours-v2.pt", {"state_dict": colour_state_dict(), "padding": torch.zeros(500_000)})
    moto.upload(huge)
    limit = v1.stat().st_size * 2
    config = bucket_yaml(project).replace("    preprocess:", f"    max_checkpoint_bytes: {limit}\n    preprocess:")
    project.write_config(config)
    daemon = start_daemon(project.config, env=moto.env())

    wait_live(daemon, v1)
    entry = wait_until(lambda: (f := file_entry(daemon, "colours-v2.pt")) and f["status"] == "rejected" and f)
    assert entry["reason"] == f"load: {huge.stat().st_size} bytes, over max_checkpoint_bytes ({limit})"
    assert cached(project) == ["colours-v1.pt"]


def test_load_checkpoint_refuses_a_file_over_the_limit_before_reading_it(project):
    from reloader.checkpoints import load_checkpoint
    from reloader.errors import CheckpointRejected

    path = project.stage("colours-v1.pt")
    size = path.stat().st_size
    with pytest.raises(CheckpointRejected, match=f"load: {size} bytes, over max_checkpoint_bytes \\({size - 1}\\)"):
        load_checkpoint(path, size - 1)
    assert load_checkpoint(path, size).size == size


def _opened_by(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if Path(os.readlink(fd)) == path:
                return True
        except OSError:  # closed meanwhile
            continue
    return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process's open files from /proc (Linux)")
def test_a_bucket_s_cache_stuck_in_a_read_holds_up_neither_answers_nor_health(project, moto, start_daemon):
    """A model moved to a bucket gets a source that reads its cache's index (and deletes what another location
    left there) as it is made. On a hung mount that read used to hold the lock that /healthz takes on the event
    loop: every request waited with it, and a liveness probe would have failed the pod."""
    project.save("colours-v1.pt")
    daemon = start_daemon(project.config, env=moto.env())
    moto.start()
    moto.upload(project.stage("colours-v1.pt"))
    index = project.root / "cache" / "colours" / ".index.json"
    index.parent.mkdir(parents=True)
    os.mkfifo(index)
    writer = os.open(index, os.O_RDWR)  # held open, writing nothing: a read blocks, as one from a hung mount would
    try:
        project.write_config(bucket_yaml(project))
        wait_until(lambda: _opened_by(daemon.proc.pid, index), what="the new source to read its cache's index")
        assert daemon.get("/healthz", timeout=10).status_code == 200
        assert daemon.predict("red").json()["predictions"][0]["label"] == "red"
    finally:
        os.close(writer)  # the read ends (empty: no index)
    wait_until(lambda: daemon.status()["checkpoints"] == uri(), what="the model to read from the bucket")
    wait_until(lambda: file_entry(daemon, "colours-v1.pt") is not None, what="the bucket's listing")
