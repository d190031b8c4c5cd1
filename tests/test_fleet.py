"""A fleet end to end: moto's S3 server, 3 replicas of `reloader serve` and a real nginx in front, started by
examples/fleet.py (what `make fleet` runs) with the tiny colour model."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import Project, free_port, png_bytes, sha256, subprocess_env, wait_until
from tinynet import colour_state_dict

from examples.fleet import Fleet, FleetError, FleetSpec, nginx_binary

MODEL = "colours"


@pytest.fixture(autouse=True)
def nginx() -> str:
    """No silent skip: without nginx these tests fail, saying how to get it (CI runs `make test`, which does)."""
    try:
        return nginx_binary()
    except FleetError as exc:
        pytest.fail(f"{exc}. The fleet tests need a real nginx.")


def spec(project: Project, tmp_path: Path, uploads: list[Path], **kw) -> FleetSpec:
    return FleetSpec(
        config=project.config,
        scratch=tmp_path / "fleet",
        port=free_port(),
        replica_ports=[free_port() for _ in range(3)],
        s3_port=free_port(),
        uploads={MODEL: uploads},
        watch={"poll_interval": 0.2},
        # tinynet lives in tests/; one torch thread each, as the fleet gives 3 replicas on 2 cores.
        env={"PYTHONPATH": subprocess_env()["PYTHONPATH"], "OMP_NUM_THREADS": "1"},
        **kw,
    )


def live_sha(url: str) -> str | None:
    try:
        live = httpx.get(f"{url}/models/{MODEL}", timeout=5).json()["live"]
    except httpx.TransportError:
        return None
    return live and live["sha256"]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class SteadyClient:
    """Threads posting through nginx, each at a steady rate; every non-200 or transport error is kept.

    Several at once, so that nginx holds several keep-alive connections to each replica: a draining
    replica closes its idle ones, and a request nginx sent on one just then must go to another replica
    (nginx retries a POST already sent only with `non_idempotent`)."""

    def __init__(self, url: str, threads: int = 4, every_s: float = 0.005) -> None:
        self.url = f"{url}/models/{MODEL}/predict"
        self.every_s = every_s
        self.answers: list[tuple[int, str | None]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, name=f"fleet-client-{i}") for i in range(threads)]

    def __enter__(self) -> SteadyClient:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    answer = client.post(self.url, content=png_bytes("green"), headers={"content-type": "image/png"})
                except httpx.TransportError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                else:
                    self.answers.append((answer.status_code, answer.headers.get("x-model-sha256")))
                    if answer.status_code != 200:
                        self.failures.append(f"{answer.status_code}: {answer.text[:200]}")
                self._stop.wait(self.every_s)


def test_a_fleet_converges_on_an_upload_and_a_rolling_restart_fails_no_request(project, tmp_path):
    v1 = project.stage("colours-v1.pt")
    with Fleet(spec(project, tmp_path, [v1])) as fleet:
        pids = fleet.pids()
        assert len(pids) == 5  # moto, 3 replicas, nginx
        for replica in fleet.replicas:
            assert live_sha(replica.url) == sha256(v1)
            assert list((replica.cache_dir / MODEL).glob("*.pt")), "each replica downloads into its own cache"

        # An upload reaches every replica through its own polling; answers through nginx name the new version.
        v2 = project.stage("colours-v2.pt", colour_state_dict(scale=5.0))
        fleet.upload(v2, MODEL)
        for replica in fleet.replicas:
            wait_until(lambda r=replica: live_sha(r.url) == sha256(v2), what=f"{replica.name} to serve v2")
        with httpx.Client(base_url=fleet.url, timeout=30) as client:
            for _ in range(6):  # round robin: every replica answers at least once
                answer = client.post(
                    f"/models/{MODEL}/predict", content=png_bytes("red"), headers={"content-type": "image/png"}
                )
                assert answer.status_code == 200
                assert answer.json()["predictions"][0]["label"] == "red"
                assert answer.headers["x-model-version"] == "2"
                assert answer.headers["x-model-sha256"] == sha256(v2)

        # A rolling restart under a steady client: each replica SIGTERMed (it drains and exits 0), started
        # again and ready before the next. nginx passes what a replica refuses to another one.
        # nginx's health checks are passive: a replica it took out comes back once a request reaches it after
        # fail_timeout. So, as an operator must, restart the next one only after nginx sent this one an answer.
        access = fleet.nginx.access_log

        def routed_since(port: int, since: float) -> bool:
            """nginx logged a 200 from the replica on `port` that ended after `since` (its new process)."""
            return any(
                f"upstream=127.0.0.1:{port} upstream_status=200" in line and float(line.rsplit("msec=", 1)[1]) > since
                for line in access.read_text().splitlines()
            )

        with SteadyClient(fleet.url) as client:
            for replica in fleet.replicas:
                before = len(client.answers)
                replica.restart()  # returns once the old process exited and the new one is ready
                ready = time.time()
                assert live_sha(replica.url) == sha256(v2), "a restarted replica serves the bucket's newest"
                wait_until(lambda b=before: len(client.answers) > b + 10, what="answers during the restart")
                wait_until(lambda r=replica, t=ready: routed_since(r.port, t), what="nginx to route to it again")
        assert client.failures == [], f"{len(client.failures)} of {len(client.answers)} failed: {client.failures[:5]}"
        assert len(client.answers) > 30
        assert {sha for _, sha in client.answers} == {sha256(v2)}
        assert [r.proc.pid for r in fleet.replicas if r.proc] != pids[1:4], "every replica was restarted"

        # nginx's access log names the replica that answered, and the version and file it served.
        log = fleet.nginx.access_log
        lines = wait_until(lambda: log.read_text().splitlines(), what="the access log")
        v2_line = re.compile(rf"upstream=127\.0\.0\.1:(\d+)\S* upstream_status=200 version=2 sha256={sha256(v2)}")
        answered_by = {int(m.group(1)) for line in lines if (m := v2_line.search(line))}
        assert answered_by == set(fleet.spec.replica_ports), lines[-5:]
        all_pids = fleet.pids()
    for pid in all_pids:
        wait_until(lambda p=pid: gone(p), what=f"process {pid} to be gone after the fleet stopped")


def test_a_start_that_fails_halfway_stops_what_it_started(project, tmp_path):
    # No valid checkpoint in the bucket: the replicas start but never become ready.
    garbage = project.root / "staging" / "colours-v1.pt"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a checkpoint" * 100)
    fleet = Fleet(spec(project, tmp_path, [garbage], ready_deadline_s=3.0))
    with pytest.raises(FleetError, match=r"replica 0 \(:\d+\) was not ready after 3.0 s"):
        with fleet:
            pass
    started = fleet.pids()
    assert len(started) == 4 and fleet.nginx is None  # moto and the 3 replicas had started; nginx had not
    assert all(gone(pid) for pid in started), "a failed start left processes behind"
