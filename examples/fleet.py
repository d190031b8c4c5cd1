"""A fleet on one machine: moto's S3 server holding the models, N replicas of `reloader serve`, nginx in front.

    python -m examples.fleet                    # what `make fleet` runs: up until Ctrl-C, then everything stops
    python -m examples.fleet upload FILE        # put a checkpoint in the fleet's bucket (boto3, no awscli needed)

The launcher is also a library: `Fleet(FleetSpec(...))` is what tests/test_fleet.py and bench/fleet.py start,
with their own config, ports and scratch folder. Everything it writes (the fleet's config, each replica's cache
and log, nginx's config, logs and temp folders, moto's log) goes under the scratch folder; by default a fresh
`tempfile.mkdtemp()` folder under $TMPDIR (/tmp), removed at exit unless `--keep`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "models"
REGION = "us-east-1"
# moto accepts any key unless told to check them; these are what the replicas and `upload` use.
ACCESS_KEY = SECRET_KEY = "testing"
PORT, REPLICA_PORTS, S3_PORT = 8080, (8081, 8082, 8083), 8090
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")
# The first load of a resnet18 on a busy 2-core machine, three replicas at once: minutes, not seconds.
READY_DEADLINE_S = 300.0
STOP_DEADLINE_S = 45.0
# nginx's passive health check: one failed attempt takes a replica out of rotation for this long.
FAIL_TIMEOUT_S = 2
# Failed attempts before nginx takes a replica out for FAIL_TIMEOUT_S (a refused request is passed to the
# next replica either way). A rolling restart must wait, after a replica is ready, until nginx has sent it
# a request again: restarting the next one earlier can leave no replica in rotation (502, "no live upstreams").
MAX_FAILS = 3


class FleetError(RuntimeError):
    """The fleet could not start; the message says which part and where its log is."""


def nginx_binary() -> str:
    """Debian puts nginx in /usr/sbin, which is not on a non-root user's PATH."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise FleetError("nginx is not installed: run `make tools` (it installs Debian's nginx where missing)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_taken(port: int) -> bool:
    """Something listens on it (SO_REUSEADDR, as servers bind: connections in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _get(url: str, timeout: float = 2.0) -> int:
    """The status of a GET, or 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text)


class Process:
    """A child in a session of its own: Ctrl-C reaches only the launcher, which stops the children in order."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT, start_new_session=True
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            raise FleetError(f"{self.name} exited with {code}; {self.log_path}:\n{_tail(self.log_path)}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_DEADLINE_S) -> int | None:
        """Signal it, wait for it; SIGKILL its process group if it outlives `timeout`. Returns its exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Its whole group (nginx's workers too), while the leader is not yet reaped: the group is ours.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode


# -- the parts ------------------------------------------------------------------------------------------


class Moto(Process):
    """moto's S3 server on loopback (its data lives in memory: stopping it empties the bucket)."""

    def __init__(self, port: int, log_path: Path) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(log_path.parent)}
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        super().__init__("moto (S3)", argv, log_path, env)
        self.port = port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, deadline_s: float = 60.0) -> None:
        end = time.monotonic() + deadline_s
        while _get(f"{self.url}/moto-api/") != 200:
            self.check()
            if time.monotonic() > end:
                raise FleetError(f"{self.name} did not answer in {deadline_s} s; see {self.log_path}")
            time.sleep(0.05)
        s3_client(self.url).create_bucket(Bucket=BUCKET)


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY
    )


def upload(endpoint: str, path: Path, model: str, name: str | None = None) -> str:
    """As a trainer uploads: boto3's upload_file (multipart above 8 MB). Returns the object's s3:// URI."""
    key = f"{model}/{name or path.name}"
    s3_client(endpoint).upload_file(str(path), BUCKET, key)
    return f"s3://{BUCKET}/{key}"


class Replica(Process):
    """One `reloader serve` with a cache folder of its own (CACHE_DIRECTORY; the fleet config names none)."""

    def __init__(self, index: int, port: int, config: Path, folder: Path, env: Mapping[str, str], args: Sequence[str]):
        self.index = index
        self.port = port
        self.cache_dir = folder / "cache"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "reloader.cli", "serve", "--config", str(config), "--port", str(port), *args]
        env = {**env, "CACHE_DIRECTORY": str(self.cache_dir)}
        super().__init__(f"replica {index} (:{port})", argv, folder / "reloader.log", env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        return _get(f"{self.url}/readyz") == 200

    def wait_ready(self, deadline_s: float = READY_DEADLINE_S) -> float:
        """Seconds until /readyz answered 200 (the port opens only after the initial load)."""
        t0 = time.monotonic()
        while not self.ready():
            self.check()
            if time.monotonic() - t0 > deadline_s:
                log = f"{self.log_path}:\n{_tail(self.log_path)}"
                raise FleetError(f"{self.name} was not ready after {deadline_s} s; {log}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def restart(self, deadline_s: float = READY_DEADLINE_S) -> float:
        """SIGTERM (it stops accepting, finishes what is in flight, exits 0), start again, wait until ready."""
        code = self.stop()
        if code != 0:
            raise FleetError(f"{self.name} exited with {code} on SIGTERM; see {self.log_path}")
        self.start()
        return self.wait_ready(deadline_s)


class Nginx(Process):
    def __init__(self, conf: Path, prefix: Path) -> None:
        argv = [nginx_binary(), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
        super().__init__("nginx", argv, prefix / "stderr.log")
        self.conf = conf
        self.prefix = prefix

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    def wait_ready(self, port: int, deadline_s: float = 30.0) -> None:
        end = time.monotonic() + deadline_s
        while True:
            self.check_started()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            if time.monotonic() > end:
                raise FleetError(f"nginx did not listen on {port} in {deadline_s} s; see {self.prefix / 'error.log'}")
            time.sleep(0.05)

    def check_started(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise FleetError(
                f"nginx exited with {self.proc.returncode}; {self.prefix / 'error.log'}:\n"
                f"{_tail(self.prefix / 'error.log')}"
            )

    def stop(self, sig: int = signal.SIGQUIT, timeout: float = STOP_DEADLINE_S) -> int | None:
        # SIGQUIT: nginx's graceful stop (requests in flight finish), then the master exits.
        return super().stop(sig, timeout)


# -- the generated configs ---------------------------------------------------------------------------------


def _absolute(value: Any, base: Path) -> Any:
    if isinstance(value, str) and not os.path.isabs(os.path.expanduser(value)):
        return str(base / value)
    return value


def fleet_config(
    source: Path,
    out: Path,
    *,
    models: Mapping[str, Mapping[str, Any]] | None = None,
    watch: Mapping[str, Any] | None = None,
    server: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Mirror `source` into `out` for the fleet: every model's checkpoints become s3://models/<model>/, the
    paths it names (warm-up images, a labels file, evaluation images) absolute, and there is no cache_dir
    (each replica gets CACHE_DIRECTORY). `models`, `watch` and `server` override keys. Returns the mapping."""
    data = yaml.safe_load(source.read_text())
    base = source.resolve().parent
    data.pop("cache_dir", None)
    for name, model in data["models"].items():
        model["checkpoints"] = f"s3://{BUCKET}/{name}/"
        if model.get("labels") != "imagenet" and isinstance(model.get("labels"), str):
            model["labels"] = _absolute(model["labels"], base)
        warmup = model.get("warmup") or {}
        if "images" in warmup:
            warmup["images"] = [_absolute(p, base) for p in warmup["images"]]
        evaluation = model.get("evaluation")
        if isinstance(evaluation, dict) and "images" in evaluation:
            evaluation["images"] = _absolute(evaluation["images"], base)
        model.update((models or {}).get(name, {}))
    data["watch"] = {**(data.get("watch") or {}), **(watch or {})}
    data["server"] = {**(data.get("server") or {}), **(server or {})}
    out.write_text(
        f"# Generated by examples/fleet.py from {source}: checkpoints from the fleet's bucket, no cache_dir\n"
        "# (each replica is started with CACHE_DIRECTORY=<its own folder>).\n" + yaml.safe_dump(data, sort_keys=False)
    )
    return data


def nginx_conf(prefix: Path, port: int, replica_ports: Sequence[int], max_body_bytes: int) -> str:
    health = f"max_fails={MAX_FAILS} fail_timeout={FAIL_TIMEOUT_S}s"
    servers = "\n".join(f"                server 127.0.0.1:{p} {health};" for p in replica_ports)
    # Bodies and answers stay in memory: when the master runs as root the workers run as nobody, who
    # cannot reach a temp folder inside a private scratch folder (and need not: nothing spills to disk).
    body = max_body_bytes + 1024
    return textwrap.dedent(
        f"""\
        # Generated by examples/fleet.py; run as: nginx -p {prefix} -c {prefix / "nginx.conf"}
        daemon off;
        master_process on;
        worker_processes 1;
        pid {prefix / "nginx.pid"};
        error_log {prefix / "error.log"} notice;

        events {{
            worker_connections 1024;
        }}

        http {{
            client_body_temp_path {prefix / "tmp/body"};
            proxy_temp_path {prefix / "tmp/proxy"};
            fastcgi_temp_path {prefix / "tmp/fastcgi"};
            uwsgi_temp_path {prefix / "tmp/uwsgi"};
            scgi_temp_path {prefix / "tmp/scgi"};
            client_max_body_size {body};
            client_body_buffer_size {body};
            proxy_max_temp_file_size 0;

            # Which replica answered ($upstream_addr lists every one tried, retries included), with what
            # status, and which model version and file (the replica's X-Model-Version / X-Model-Sha256).
            log_format fleet '$time_iso8601 $remote_addr "$request" $status '
                             'upstream=$upstream_addr upstream_status=$upstream_status '
                             'version=$upstream_http_x_model_version sha256=$upstream_http_x_model_sha256 '
                             'request_time=$request_time upstream_time=$upstream_response_time msec=$msec';
            access_log {prefix / "access.log"} fleet;

            upstream reloader {{
                # Passive health checks: max_fails failed attempts (refused, reset, timeout, 502/503 below)
                # take a replica out for fail_timeout; then one request probes it again. A request whose
                # attempt fails is passed to the next replica either way (proxy_next_upstream).
{servers}
                keepalive 32;
                # Below uvicorn's 5 s keep-alive, so nginx never reuses a connection the replica is closing.
                keepalive_timeout 4s;
            }}

            server {{
                listen 127.0.0.1:{port};

                location / {{
                    proxy_pass http://reloader;
                    proxy_http_version 1.1;
                    proxy_set_header Connection "";
                    proxy_set_header Host $host;
                    proxy_connect_timeout 2s;
                    proxy_read_timeout 60s;
                    # A draining replica (SIGTERM: its listening socket is closed) or a restarting one
                    # refuses connections; one not ready answers 503. Such a request goes to the next
                    # replica. non_idempotent lets nginx retry POSTs too: a predict POST has no side
                    # effects (it only reads the image and answers), so sending it again is safe.
                    proxy_next_upstream error timeout http_502 http_503 non_idempotent;
                    proxy_next_upstream_tries {len(replica_ports)};
                    proxy_next_upstream_timeout 30s;
                }}
            }}
        }}
        """
    )


# -- the fleet ---------------------------------------------------------------------------------------------


@dataclass
class FleetSpec:
    config: Path  # the config to mirror, e.g. config/models.yaml
    scratch: Path  # everything the fleet writes goes here
    port: int = PORT  # nginx
    replica_ports: Sequence[int] = REPLICA_PORTS
    s3_port: int = S3_PORT
    # Files put in the bucket before the replicas start, per model; None: each model's local checkpoints folder.
    uploads: Mapping[str, Sequence[Path]] | None = None
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # per-model config overrides
    watch: Mapping[str, Any] = field(default_factory=dict)
    server: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)  # added to every replica's environment
    replica_args: Sequence[str] = ()  # after `serve --config C --port P`
    # torch threads per replica: the replicas share this machine's cores (None: cores // replicas, at least 1).
    threads: int | None = None
    ready_deadline_s: float = READY_DEADLINE_S


class Fleet:
    """`with Fleet(spec) as fleet:` starts moto, uploads, the replicas and nginx; leaving stops all of them.
    A start that fails halfway stops what it had started before the error propagates."""

    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        self.scratch = spec.scratch.resolve()
        self.config_path = self.scratch / "fleet.yaml"
        self.moto = Moto(spec.s3_port, self.scratch / "moto.log")
        self.replicas: list[Replica] = []
        self.nginx: Nginx | None = None
        self.started_in_s = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.spec.port}"

    @property
    def s3_url(self) -> str:
        return self.moto.url

    def __enter__(self) -> Fleet:
        try:
            self.start()
        except BaseException:  # Ctrl-C during start-up too
            self.stop()
            raise
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        t0 = time.monotonic()
        spec = self.spec
        nginx_binary()
        taken = [p for p in (spec.port, *spec.replica_ports, spec.s3_port) if _port_taken(p)]
        if taken:
            raise FleetError(f"port(s) {taken} on 127.0.0.1 already in use: is another fleet running?")
        self.scratch.mkdir(parents=True, exist_ok=True)
        data = fleet_config(spec.config, self.config_path, models=spec.models, watch=spec.watch, server=spec.server)
        self._check_config()
        uploads = spec.uploads if spec.uploads is not None else self._local_checkpoints(data)

        self.moto.start()
        self.moto.wait_ready()
        for model, files in uploads.items():
            for path in files:
                upload(self.s3_url, path, model)

        env = self._replica_env()
        for i, port in enumerate(spec.replica_ports):
            folder = self.scratch / f"replica-{i}"
            folder.mkdir(exist_ok=True)
            self.replicas.append(Replica(i, port, self.config_path, folder, env, spec.replica_args))
        for replica in self.replicas:  # all at once: they load in parallel
            replica.start()
        for replica in self.replicas:
            replica.wait_ready(spec.ready_deadline_s)

        prefix = self.scratch / "nginx"
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        max_body = int((data.get("server") or {}).get("max_body_bytes", 20_000_000))
        (prefix / "nginx.conf").write_text(nginx_conf(prefix, spec.port, spec.replica_ports, max_body))
        self.nginx = Nginx(prefix / "nginx.conf", prefix)
        self.nginx.start()
        self.nginx.wait_ready(spec.port)
        self.started_in_s = time.monotonic() - t0

    def _check_config(self) -> None:
        """The daemon's own parser on the generated config, so a bad one fails here, not three times over."""
        from reloader.config import load_config
        from reloader.errors import ConfigError

        try:
            load_config(self.config_path)
        except ConfigError as exc:
            raise FleetError(f"the generated fleet config is invalid: {exc}") from None

    def _local_checkpoints(self, data: Mapping[str, Any]) -> dict[str, list[Path]]:
        source = yaml.safe_load(self.spec.config.read_text())
        base = self.spec.config.resolve().parent
        found: dict[str, list[Path]] = {}
        for name in data["models"]:
            folder = Path(_absolute(str(source["models"][name].get("checkpoints", "")), base))
            files = sorted(p for p in folder.glob("*") if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
            if not files:
                raise FleetError(f"no checkpoint for model {name!r} in {folder}: train one first (`make run` does)")
            found[name] = files
        return found

    def _replica_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        threads = self.spec.threads or max(1, (os.cpu_count() or 1) // len(self.spec.replica_ports))
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env.update(
            AWS_ENDPOINT_URL=self.s3_url,
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SECRET_KEY,
            AWS_DEFAULT_REGION=REGION,
            # Nothing from this machine's own AWS setup.
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            AWS_EC2_METADATA_DISABLED="true",
        )
        env.update(self.spec.env)
        return env

    def upload(self, path: Path, model: str, name: str | None = None) -> str:
        return upload(self.s3_url, path, model, name)

    def processes(self) -> list[Process]:
        return [p for p in (self.nginx, *self.replicas, self.moto) if p is not None]

    def pids(self) -> list[int]:
        return [p.proc.pid for p in self.processes() if p.proc is not None]

    def check(self) -> None:
        """Raise FleetError if moto or nginx has died (a dead replica is nginx's to route around)."""
        self.moto.check()
        if self.nginx is not None:
            self.nginx.check_started()

    def stop(self) -> None:
        """nginx first (no new requests), then the replicas (they drain), then moto. Idempotent."""
        with _signals_deferred():
            if self.nginx is not None:
                self.nginx.stop()
            for replica in self.replicas:
                if replica.alive():
                    replica.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            for replica in self.replicas:
                replica.stop()
            self.moto.stop()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """A second Ctrl-C while stopping must not leave children behind: SIGINT/SIGTERM wait until we are done."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- the command line --------------------------------------------------------------------------------------


def _ports(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(","))


def _instructions(fleet: Fleet, scratch: Path) -> str:
    data = yaml.safe_load(fleet.config_path.read_text())
    model, config = next(iter(data["models"].items()))
    image = next(iter((config.get("warmup") or {}).get("images") or []), "image.png")
    newest = max(fleet.spec.uploads[model] if fleet.spec.uploads else fleet._local_checkpoints(data)[model])
    predict = f"{fleet.url}/models/{model}/predict"
    python = os.path.relpath(sys.executable) if not os.path.relpath(sys.executable).startswith("..") else sys.executable
    return textwrap.dedent(
        f"""
        fleet: ready in {fleet.started_in_s:.1f} s. The one URL to call is nginx's:

          curl -i --data-binary @{os.path.relpath(image)} -H 'Content-Type: image/png' {predict}

        Upload a checkpoint (each replica polls s3://{BUCKET}/{model}/, validates what is new and swaps it in), e.g.
        the newest one again under a higher version number, or a new epoch after `make train-more`:

          {python} -m examples.fleet upload {os.path.relpath(newest)} --name {model}-v100.pt --endpoint {fleet.s3_url}

        Replicas: {", ".join(r.url for r in fleet.replicas)} (GET /models/{model} on each shows its live version).
        Logs: {scratch}/nginx/access.log (upstream, status, version and sha256 of every request),
              {scratch}/replica-N/reloader.log, {scratch}/moto.log
        Ctrl-C stops everything.
        """
    )


def _up(args: argparse.Namespace) -> int:
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="reloader-fleet-"))
    spec = FleetSpec(
        config=args.config, scratch=scratch, port=args.port, replica_ports=args.replica_ports, s3_port=args.s3_port
    )

    def stop_on_term(sig: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_term)
    print(
        f"fleet: starting moto (S3) on :{spec.s3_port}, {len(spec.replica_ports)} replicas on "
        f"{', '.join(f':{p}' for p in spec.replica_ports)} and nginx on :{spec.port}; files in {scratch}",
        flush=True,
    )
    try:
        with Fleet(spec) as fleet:
            print(_instructions(fleet, scratch), flush=True)
            while True:
                fleet.check()
                time.sleep(0.5)
    except KeyboardInterrupt:
        print("fleet: stopped", flush=True)
        return 0
    except FleetError as exc:
        print(f"fleet: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if args.keep or args.scratch:
            print(f"fleet: kept {scratch}", flush=True)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def _upload(args: argparse.Namespace) -> int:
    uri = upload(args.endpoint, args.file, args.model, args.name)
    print(f"uploaded {args.file} to {uri}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.fleet", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command")
    up = commands.add_parser("up", help="start the fleet (the default), until Ctrl-C")
    for p in (parser, up):
        p.add_argument("--config", type=Path, default=ROOT / "config/models.yaml", help="the config to mirror")
        p.add_argument("--port", type=int, default=PORT, help="nginx's port (the one URL to call)")
        p.add_argument("--replica-ports", type=_ports, default=REPLICA_PORTS, help="comma-separated")
        p.add_argument("--s3-port", type=int, default=S3_PORT, help="moto's S3 server")
        p.add_argument("--scratch", type=Path, help="folder for configs, caches, logs (kept)")
        p.add_argument("--keep", action="store_true", help="keep the temp scratch folder at exit")
    put = commands.add_parser("upload", help="upload a checkpoint to the fleet's bucket with boto3")
    put.add_argument("file", type=Path)
    put.add_argument("--model", default="shapes", help="the prefix s3://models/<model>/ (default shapes)")
    put.add_argument("--name", help="the object's name (default: the file's)")
    put.add_argument("--endpoint", default=f"http://127.0.0.1:{S3_PORT}", help="the fleet's S3 endpoint")
    args = parser.parse_args(argv)
    return _upload(args) if args.command == "upload" else _up(args)


if __name__ == "__main__":
    raise SystemExit(main())
