"""The daemon's log: one line per event that matters, as text for people or as JSON for shippers."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

from conftest import DEADLINE, Daemon, Project, reloader_cmd, sha256, subprocess_env, wait_until
from tinynet import colour_state_dict

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +[\w.]+: \S")
CHECKS = ["load", "structure", "finite", "warmup"]


def json_lines(text: str) -> list[dict[str, Any]]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
        assert {"time", "level", "logger", "message"} <= entry.keys(), line
        entries.append(entry)
    return entries


def events(daemon: Daemon, name: str, **fields: Any) -> list[dict[str, Any]]:
    """The JSON entries of one event whose fields include `fields`."""
    return [
        e for e in json_lines(daemon.log()) if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
    ]


def test_json_logs_are_one_object_per_line_with_one_line_per_event(project: Project, start_daemon):
    first = project.save("colours-v1.pt")
    daemon = start_daemon(project.config, options=["--log-format", "json"])
    good = project.save("colours-v2.pt")
    daemon.wait_live(good)
    bad = project.save("colours-v3.pt", colour_state_dict(permute=(1, 0, 2)))
    daemon.wait_file(bad, "rejected")
    garbage = project.checkpoints / "colours-v4.pt"
    garbage.write_bytes(b"not a checkpoint")
    daemon.wait_file(garbage, "rejected")
    # A rescan must not log the known rejections again, not even of a file torch cannot load at all.
    passes = daemon.status()["passes"]
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.status()["passes"] > passes, what="the SIGHUP's rescan")
    project.write_config("models: [not, a, mapping")
    wait_until(lambda: events(daemon, "config_rejected"), what="the broken config to be rejected")
    assert daemon.stop() == 0

    entries = json_lines(daemon.log())
    by_event = [e.get("event") for e in entries]
    (start,) = events(daemon, "start")
    assert start["config"] == str(project.config)
    assert events(daemon, "config_loaded")[0]["models"] == ["colours"]
    (validated_first,) = events(daemon, "checkpoint_validated", file=str(first))
    assert list(validated_first["timings_ms"]) == CHECKS
    (seen,) = events(daemon, "checkpoint_seen", file=str(good))
    (validated,) = events(daemon, "checkpoint_validated", file=str(good))
    (swapped,) = events(daemon, "checkpoint_swapped", file=str(good))
    assert entries.index(seen) < entries.index(validated) < entries.index(swapped)
    assert (swapped["model"], swapped["version"], swapped["previous_version"]) == ("colours", 2, 1)
    assert swapped["sha256"] == sha256(good)
    assert set(swapped["timings_ms"]) == {*CHECKS, "total", "since_detected"}
    assert swapped["timings_ms"]["since_detected"] >= swapped["timings_ms"]["total"] > 0
    assert len(events(daemon, "checkpoint_seen", file=str(bad))) == 1
    (rejected,) = events(daemon, "checkpoint_rejected", file=str(bad))
    assert rejected["level"] == "warning"
    assert rejected["sha256"] == sha256(bad)
    assert "expected 'red', got 'green'" in rejected["reason"]
    (unloadable,) = events(daemon, "checkpoint_rejected", file=str(garbage))
    assert unloadable["reason"].startswith("load: ")
    (config_rejected,) = events(daemon, "config_rejected")
    assert config_rejected["level"] == "error"
    assert str(project.config) in config_rejected["error"]
    (stop,) = events(daemon, "stop")
    assert stop["exit_code"] == 0
    assert by_event[-1] == "stop"
    assert any(e["logger"] == "uvicorn.access" for e in entries)
    assert not [e for e in entries if e["level"] == "error" and e.get("event") != "config_rejected"]


def test_a_config_the_daemon_refuses_at_start_is_one_json_line_and_exit_2(tmp_path: Path):
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  colours:\n    arch: tinynet:colour_net\n")

    result = subprocess.run(
        reloader_cmd("--log-format", "json", "serve", "--config", str(config)),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=DEADLINE,
    )

    assert result.returncode == 2
    (entry,) = json_lines(result.stderr)
    assert entry["event"] == "config_rejected"
    assert entry["level"] == "error"
    assert str(config) in entry["error"]


def test_text_logs_are_the_default_and_carry_access_lines(project: Project, start_daemon):
    project.save("colours-v1.pt")
    daemon = start_daemon(project.config)

    assert daemon.predict("red").status_code == 200
    wait_until(lambda: '"POST /models/colours/predict HTTP/1.1" 200' in daemon.log(), what="the access line")
    daemon.stop()

    lines = daemon.log().splitlines()
    assert lines and all(TEXT_LINE.match(line) for line in lines), "\n".join(lines)
    assert any("reloader.jobs: model colours: version 1 live (colours-v1.pt" in line for line in lines)


def test_no_access_log_leaves_every_other_line(project: Project, start_daemon):
    project.save("colours-v1.pt")
    daemon = start_daemon(project.config, "--no-access-log")

    assert daemon.predict("red").status_code == 200
    # uvicorn writes an access line before the response goes out; a later line proves it had its chance.
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP: re-reading the config" in daemon.log(), what="the SIGHUP line")

    log = daemon.log()
    assert "uvicorn.access" not in log
    assert "HTTP/1.1" not in log
    assert "reloader.server: reloader starting with" in log
