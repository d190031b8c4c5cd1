"""The validation gate through a running daemon: bad checkpoints never take the live one down."""

from __future__ import annotations

import os
import signal

import torch
import torchvision
from conftest import Project, colours_yaml, sha256
from tinynet import colour_state_dict

# Polling once an hour: only SIGHUP makes this daemon look at its folder, which is what these tests exercise.
MANUAL = "watch:\n  poll: true\n  poll_interval: 3600\n"


class Evil:
    """Unpickling this would create a file: the proof that no plain unpickle ever runs."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_new_valid_checkpoint_plus_sighup_is_served_with_its_version_and_sha256(project: Project, start_daemon):
    project.save("colours-v1.pt")
    project.write_config(colours_yaml(watch=MANUAL))
    daemon = start_daemon(project.config)
    assert daemon.predict().json()["version"] == 1

    new = project.save("colours-v2.pt", colour_state_dict(scale=6.0))
    daemon.signal(signal.SIGHUP)
    daemon.wait_live(new)

    body = daemon.predict("blue").json()
    assert (body["version"], body["sha256"]) == (2, sha256(new))
    assert body["predictions"][0]["label"] == "blue"


def test_each_bad_checkpoint_is_rejected_with_its_reason_while_the_old_version_answers(project: Project, start_daemon):
    live = project.save("colours-v1.pt")
    project.write_config(colours_yaml(watch=MANUAL))
    daemon = start_daemon(project.config)
    folder = project.checkpoints
    pwned = project.root / "pwned"

    good_bytes = (folder / "colours-v1.pt").read_bytes()
    (folder / "colours-v2.pt").write_bytes(good_bytes[: len(good_bytes) // 2])
    (folder / "colours-v3.pt").write_bytes(os.urandom(4096))
    torch.save(torchvision.models.squeezenet1_1(num_classes=3).state_dict(), folder / "colours-v4.pt")
    torch.save(colour_state_dict(num_classes=4), folder / "colours-v5.pt")
    nan = colour_state_dict()
    nan["fc.weight"][0, 0] = float("nan")
    torch.save(nan, folder / "colours-v6.pt")
    torch.save(colour_state_dict(permute=(1, 0, 2)), folder / "colours-v7.pt")
    torch.save({"fc.weight": Evil(str(pwned))}, folder / "colours-v8.pt")
    expected = {
        "colours-v2.pt": "load: not a readable torch.save file",
        "colours-v3.pt": "load: ",
        "colours-v4.pt": "structure: does not fit tinynet:colour_net with num_classes=3: missing keys: norm.weight",
        "colours-v5.pt": "structure: does not fit tinynet:colour_net with num_classes=3: mis-shaped keys: fc.weight",
        "colours-v6.pt": "finite: non-finite (NaN/inf) values in fc.weight (1 of 9 values)",
        "colours-v7.pt": "warmup: red.png: expected 'red', got 'green'",
        "colours-v8.pt": "load: pickle refused by the weights_only loader",
    }

    daemon.signal(signal.SIGHUP)

    for name, reason in expected.items():
        status = daemon.wait_file(folder / name, "rejected")
        assert status["reason"].startswith(reason), (name, status["reason"])
        assert daemon.predict("red").json()["sha256"] == sha256(live)
    assert "Unsupported global: GLOBAL io.open" in daemon.file_status(folder / "colours-v8.pt")["reason"]
    assert not pwned.exists()
    assert daemon.status()["live"]["version"] == 1
    assert daemon.get("/readyz").status_code == 200


def test_at_start_the_newest_valid_checkpoint_serves_and_newer_broken_ones_are_skipped(project: Project, start_daemon):
    project.save("colours-v1.pt")
    good = project.save("colours-v2.pt", colour_state_dict(scale=5.0))
    (project.checkpoints / "colours-v3.pt").write_bytes(b"not a checkpoint")

    daemon = start_daemon(project.config)

    assert daemon.status()["live"]["sha256"] == sha256(good)
    assert daemon.file_status(project.checkpoints / "colours-v3.pt")["status"] == "rejected"
    assert daemon.file_status(project.checkpoints / "colours-v1.pt")["status"] == "standby"


def test_the_daemon_refuses_to_start_when_weights_only_loading_is_disabled(project: Project):
    import subprocess

    from conftest import reloader_cmd, subprocess_env

    project.save("colours-v1.pt")
    result = subprocess.run(
        reloader_cmd("serve", "--config", str(project.config)),
        env=subprocess_env(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set" in result.stderr
    assert "Traceback" not in result.stderr
