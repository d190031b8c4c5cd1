"""Live reload of checkpoints: real tools write files into a running daemon's folder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import Daemon, Project, colours_yaml, sha256, wait_until
from tinynet import colour_state_dict


# Each of these is a distinct valid model: same answers, different bytes.
def good(i: int) -> dict:
    return colour_state_dict(scale=3.0 + i)


BAD = colour_state_dict(permute=(1, 0, 2))
POLLING = "watch:\n  poll: true\n  poll_interval: 0.1\n  settle_ms: 100\n"


@pytest.fixture
def running(project: Project, start_daemon) -> tuple[Project, Daemon]:
    project.save("colours-v1.pt", good(1))
    return project, start_daemon(project.config)


def validations(daemon: Daemon, path: Path) -> int:
    return sum(1 for e in daemon.status()["events"] if e.get("file") == str(path) and e["event"] != "incomplete")


def test_mv_into_the_folder_goes_live(running):
    project, daemon = running
    staged = project.stage("v2.pt", good(2))
    target = project.checkpoints / "colours-v2.pt"

    subprocess.run(["mv", str(staged), str(target)], check=True)

    status = daemon.wait_live(target)
    swap = status["events"][0]
    assert (swap["event"], swap["file"]) == ("swapped", str(target))
    assert set(swap["timings_ms"]) >= {"load", "structure", "finite", "warmup", "total", "since_detected"}


def test_os_replace_from_a_hidden_temp_name_goes_live(running):
    project, daemon = running
    target = project.checkpoints / "colours-v2.pt"
    tmp = project.checkpoints / ".colours-v2.pt.tmp"
    torch.save(good(2), tmp)

    os.replace(tmp, target)

    daemon.wait_live(target)


def test_rsync_which_writes_a_hidden_temp_file_and_renames_it_goes_live(running):
    project, daemon = running
    staged = project.stage("colours-v2.pt", good(2))

    subprocess.run(["rsync", str(staged), str(project.checkpoints) + "/"], check=True)

    daemon.wait_live(project.checkpoints / "colours-v2.pt")
    assert not any(Path(f["path"]).name.startswith(".") for f in daemon.status()["files"])


def test_cp_to_a_new_name_goes_live(running):
    project, daemon = running
    staged = project.stage("v2.pt", good(2))

    subprocess.run(["cp", str(staged), str(project.checkpoints / "colours-v2.pt")], check=True)

    daemon.wait_live(project.checkpoints / "colours-v2.pt")


def test_torch_save_straight_into_the_folder_goes_live(running):
    project, daemon = running
    target = project.checkpoints / "colours-v2.pt"

    torch.save(good(2), target)

    daemon.wait_live(target)


SLOW_WRITER = """
import sys, time
data = open(sys.argv[1], "rb").read()
chunks = 12
with open(sys.argv[2], "wb") as out:
    for i in range(chunks):
        out.write(data[i * len(data) // chunks:(i + 1) * len(data) // chunks])
        out.flush()
        print("chunk", i, flush=True)
        time.sleep(0.25)
"""


def test_a_slow_chunked_writer_is_never_loaded_half_written(running):
    project, daemon = running
    staged = project.stage("v2.pt", good(2))
    target = project.checkpoints / "colours-v2.pt"
    seen: set[str] = set()
    writer = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(staged), str(target)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    for line in writer.stdout:
        status = daemon.file_status(target)
        if status is not None:
            seen.add(status["status"])
        assert daemon.predict().json()["version"] == 1, f"served a half-written file after {line}"
    assert writer.wait() == 0

    daemon.wait_live(target)
    assert "rejected" not in seen
    assert validations(daemon, target) == 1


PAUSING_WRITER = """
import sys
data = open(sys.argv[1], "rb").read()
with open(sys.argv[2], "wb") as out:
    out.write(data[: len(data) // 2])
    out.flush()
    print("half", flush=True)
    sys.stdin.readline()  # paused, the file still open, until the test says go on
    out.write(data[len(data) // 2 :])
"""


def test_a_writer_pausing_with_the_file_open_is_never_judged_before_its_close(running):
    project, daemon = running
    staged = project.stage("v2.pt", good(2))
    target = project.checkpoints / "colours-v2.pt"
    writer = subprocess.Popen(
        [sys.executable, "-c", PAUSING_WRITER, str(staged), str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdin is not None and writer.stdout is not None
    assert writer.stdout.readline() == "half\n"
    # The pause outlasts the quiet period after which a file without a close counts as finished: the
    # daemon looks at it, finds it still open for writing, and leaves it unjudged.
    # The file list is the pass's, published when it ends: wait on it, not on the event sent mid-pass.
    entry = wait_until(
        lambda: (f := daemon.file_status(target)) and "open for writing" in (f["reason"] or "") and f,
        what="the daemon to look at the paused file",
    )
    assert entry["status"] == "incomplete"
    assert any(e["event"] == "incomplete" and e["file"] == str(target) for e in daemon.status()["events"])
    assert validations(daemon, target) == 0
    assert daemon.predict().json()["version"] == 1

    writer.stdin.write("go on\n")
    writer.stdin.close()
    assert writer.wait() == 0

    daemon.wait_live(target)
    assert validations(daemon, target) == 1
    assert 'reloader_rejections_total{model="colours"' not in daemon.get("/metrics").text


def test_overwriting_the_live_file_with_new_content_validates_and_swaps(running):
    project, daemon = running
    live = project.checkpoints / "colours-v1.pt"
    staged = project.stage("v1-retrained.pt", good(5))

    subprocess.run(["cp", str(staged), str(live)], check=True)

    daemon.wait_live(sha256(staged))
    assert daemon.status()["live"]["file"] == "present"


def test_overwriting_the_live_file_with_bad_content_keeps_serving_from_memory(running):
    project, daemon = running
    live = project.checkpoints / "colours-v1.pt"
    old_sha = sha256(live)
    older = project.save("colours-v0.pt", good(0))
    staged = project.stage("broken.pt", BAD)

    subprocess.run(["cp", str(staged), str(live)], check=True)

    daemon.wait_file(live, "rejected")
    status = daemon.status()
    assert status["live"]["sha256"] == old_sha
    assert status["live"]["file"] == "replaced"
    assert daemon.file_status(older)["status"] == "standby"
    assert daemon.predict().json()["sha256"] == old_sha


def test_deleting_the_live_checkpoint_falls_back_to_the_newest_remaining_valid_one(running):
    project, daemon = running
    v2 = project.save("colours-v2.pt", good(2))
    daemon.wait_live(v2)
    v3_bad = project.save("colours-v0.pt", BAD)  # older than v1, and broken
    (project.checkpoints / "colours-v3.pt").write_bytes(b"junk")
    daemon.wait_file(project.checkpoints / "colours-v3.pt", "rejected")

    v2.unlink()

    status = daemon.wait_live(project.checkpoints / "colours-v1.pt")
    assert status["live"]["report"]["passed"] is True
    assert daemon.file_status(v3_bad)["status"] == "standby"


def test_deleting_every_checkpoint_keeps_serving_from_memory_and_says_so(running):
    project, daemon = running
    live = project.checkpoints / "colours-v1.pt"
    sha = sha256(live)

    live.unlink()

    wait_until(lambda: daemon.status()["live"]["file"] == "deleted", what="the status to report the file gone")
    assert daemon.predict().json()["sha256"] == sha
    assert daemon.get("/readyz").status_code == 200


def test_a_burst_of_ten_epochs_goes_live_with_the_newest_without_validating_every_one(running):
    project, daemon = running
    staging = project.root / "burst"
    staging.mkdir()
    for epoch in range(2, 12):
        torch.save(good(epoch), staging / f"colours-v{epoch}.pt")

    subprocess.run(f"mv {staging}/*.pt {project.checkpoints}/", shell=True, check=True)

    daemon.wait_live(project.checkpoints / "colours-v11.pt")
    validated = [e for e in daemon.status()["events"] if e["event"] in ("swapped", "rejected")]
    assert len(validated) < 1 + 10, validated  # the initial v1, then far fewer than all ten
    assert sum(1 for f in daemon.status()["files"] if f["status"] == "standby") >= 5


def test_a_rejected_file_is_not_tried_again_until_its_content_changes(running):
    project, daemon = running
    bad = project.checkpoints / "colours-v2.pt"
    torch.save(BAD, bad)
    daemon.wait_file(bad, "rejected")
    passes = daemon.status()["passes"]

    os.utime(bad)  # same content, new mtime: re-hashed, not re-validated
    daemon.signal(signal.SIGHUP)  # a full rescan
    wait_until(lambda: (s := daemon.status())["passes"] > passes and not s["reloading"], what="a finished pass")
    assert validations(daemon, bad) == 1

    torch.save(good(2), bad)
    daemon.wait_live(bad)
    assert validations(daemon, bad) == 2


def test_files_that_are_not_checkpoints_cause_no_reload(running):
    project, daemon = running
    passes = daemon.status()["passes"]
    folder = project.checkpoints
    (folder / "train.log").write_text("epoch 3 loss 0.1\n")
    torch.save({"lr": 0.1}, folder / "optimizer.bin")
    torch.save(good(7), folder / ".hidden-v9.pt")
    torch.save(good(7), folder / "colours-v9.pt.part")
    shutil.copy(folder / "colours-v1.pt", folder / "colours-v9.pt~")

    sentinel = project.stage("colours-v2.pt", good(2))
    os.replace(sentinel, folder / "colours-v2.pt")
    daemon.wait_live(folder / "colours-v2.pt")

    status = daemon.status()
    assert status["passes"] == passes + 1
    assert {Path(f["path"]).name for f in status["files"]} == {"colours-v1.pt", "colours-v2.pt"}


def test_zero_requests_fail_under_load_across_ten_good_and_bad_swaps(running):
    project, daemon = running
    valid = {sha256(project.checkpoints / "colours-v1.pt")}
    failures: list[str] = []
    answers: list[str] = []
    stop = threading.Event()

    def client() -> None:
        import httpx
        from conftest import png_bytes

        with httpx.Client(base_url=daemon.url, timeout=30) as http:
            while not stop.is_set():
                try:
                    response = http.post("/predict", content=png_bytes("green"))
                    if response.status_code != 200 or response.json()["predictions"][0]["label"] != "green":
                        failures.append(f"{response.status_code} {response.text[:200]}")
                    else:
                        answers.append(response.json()["sha256"])
                except Exception as exc:  # a reset or a body that is not JSON is a failure too, not a dead client
                    failures.append(f"{type(exc).__name__}: {exc}")

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        for i in range(2, 14):
            path = project.checkpoints / f"colours-v{i}.pt"
            if i % 3 == 0:
                torch.save(BAD, path)
                daemon.wait_file(path, "rejected")
            else:
                torch.save(good(i), path)
                valid.add(sha256(path))
                daemon.wait_live(path)
            before = len(answers)
            wait_until(lambda b=before: len(answers) > b, what="requests to keep being answered")
    finally:
        stop.set()
        for thread in clients:
            thread.join()

    assert failures == []
    assert len(answers) > 20
    assert set(answers) <= valid
    swaps = [e for e in daemon.status()["events"] if e["event"] == "swapped"]
    assert len(swaps) >= 8 + 1


def test_the_polling_observer_works_without_inotify(project: Project, start_daemon):
    project.save("colours-v1.pt", good(1))
    project.write_config(colours_yaml(watch=POLLING))
    daemon = start_daemon(project.config)
    assert "with polling" in daemon.log()

    staged = project.stage("v2.pt", good(2))
    subprocess.run(["mv", str(staged), str(project.checkpoints / "colours-v2.pt")], check=True)
    daemon.wait_live(project.checkpoints / "colours-v2.pt")

    torch.save(good(3), project.checkpoints / "colours-v3.pt")
    daemon.wait_live(project.checkpoints / "colours-v3.pt")


def test_the_daemon_serves_a_model_whose_folder_is_filled_only_after_start(project: Project, start_daemon):
    daemon = start_daemon(project.config, ready=False)
    assert daemon.predict().status_code == 503

    project.save("colours-v1.pt", good(1))

    daemon.wait_live(project.checkpoints / "colours-v1.pt")
    assert daemon.get("/readyz").status_code == 200


@pytest.mark.parametrize("watch", ["", POLLING], ids=["inotify", "polling"])
def test_a_deleted_folder_keeps_its_model_serving_and_is_watched_again_when_it_comes_back(
    project: Project, start_daemon, watch: str
):
    project.save("colours-v1.pt", good(1))
    project.write_config(colours_yaml(watch=watch))
    daemon = start_daemon(project.config)
    sha = sha256(project.checkpoints / "colours-v1.pt")

    shutil.rmtree(project.checkpoints)
    wait_until(lambda: "is gone; watching it again when it comes back" in daemon.log(), what="the watcher to notice")
    assert daemon.predict().json()["sha256"] == sha
    assert daemon.get("/healthz").status_code == 200
    subprocess.run(["mkdir", str(project.checkpoints)], check=True)
    wait_until(lambda: f"watching {project.checkpoints} again" in daemon.log(), what="the folder to be watched again")
    subprocess.run(["cp", str(project.stage("v2.pt", good(2))), str(project.checkpoints / "colours-v2.pt")], check=True)

    daemon.wait_live(project.checkpoints / "colours-v2.pt")
    assert daemon.get("/healthz").status_code == 200


@pytest.mark.parametrize("watch", ["", POLLING], ids=["inotify", "polling"])
def test_a_folder_renamed_away_and_replaced_by_another_is_the_one_watched(project: Project, start_daemon, watch: str):
    # inotify's watch follows the folder it was set on, wherever it is renamed to: the new folder at the
    # path would go unwatched.
    project.save("colours-v1.pt", good(1))
    project.write_config(colours_yaml(watch=watch))
    daemon = start_daemon(project.config)
    incoming = project.root / "incoming"
    incoming.mkdir()
    torch.save(good(2), incoming / "colours-v2.pt")

    subprocess.run(["mv", str(project.checkpoints), str(project.root / "colours.old")], check=True)
    subprocess.run(["mv", str(incoming), str(project.checkpoints)], check=True)

    daemon.wait_live(project.checkpoints / "colours-v2.pt")
    subprocess.run(["cp", str(project.stage("v3.pt", good(3))), str(project.checkpoints / "colours-v3.pt")], check=True)
    daemon.wait_live(project.checkpoints / "colours-v3.pt")  # a file written into the new folder is seen


def test_a_folder_missing_at_start_is_watched_once_it_is_moved_in_full(project: Project, start_daemon):
    # The folder arrives with its checkpoint already inside: no event inside it ever fires, only the rescan
    # that follows the new watch can find the file.
    project.checkpoints.rmdir()
    daemon = start_daemon(project.config, ready=False)
    assert f"cannot watch {project.checkpoints}" in daemon.log()
    assert daemon.predict().status_code == 503
    staged = project.root / "incoming"
    staged.mkdir()
    torch.save(good(1), staged / "colours-v1.pt")

    subprocess.run(["mv", str(staged), str(project.checkpoints)], check=True)

    daemon.wait_live(project.checkpoints / "colours-v1.pt")
    assert daemon.get("/healthz").status_code == 200
