"""Slow clients, too many connections and unparseable requests (issue 13), against a real daemon's socket."""

from __future__ import annotations

import json
import select
import socket
import threading

import httpx
import pytest
from conftest import DEADLINE, Project, colours_yaml, wait_until

HEAD = b"GET /models/colours HTTP/1.1\r\nHost: reloader\r\nUser-Agent: slowloris\r\n\r\n"


def answer(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Read until the server closes: the status, the JSON body, and the raw response.

    A client still sending when the server closes gets a reset for the bytes that arrive after the close
    (TCP answers them so): after a whole answer, that reset is the close."""
    sock.settimeout(DEADLINE)
    raw = b""
    try:
        while chunk := sock.recv(65536):
            raw += chunk
    except ConnectionResetError:
        if not _whole(raw):
            raise
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), raw


def _whole(raw: bytes) -> bool:
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next((line.split(b":", 1)[1] for line in lines if line.startswith(b"content-length:")), None)
    return bool(sep) and length is not None and len(body) == int(length)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)


@pytest.fixture
def daemon(project: Project, start_daemon):
    project.save("colours-v1.pt")
    project.config.write_text(colours_yaml(server="  read_timeout_s: 1\n"))
    return start_daemon(project.config)


def test_connections_that_send_nothing_or_dribble_are_closed_and_keep_no_one_out(daemon):
    idle = [connect(daemon.port) for _ in range(10)]
    dribbling = [connect(daemon.port) for _ in range(30)]
    body_dribbling = connect(daemon.port)
    body_dribbling.sendall(b"POST /models/colours/predict HTTP/1.1\r\nHost: r\r\nContent-Length: 1000\r\n\r\n")
    stop = threading.Event()

    # A head that never ends: only the server's deadline closes these connections.
    endless = HEAD[: HEAD.index(b"\r\n\r\n") + 2] + b"X-More: 1\r\n" * 10_000

    def dribble() -> None:
        at, answered = 0, set()
        while not stop.is_set():
            # Not to a socket the server answered: it has closed, and would only answer with a reset.
            answered.update(select.select([*dribbling, body_dribbling], [], [], 0)[0])
            for sock in (*dribbling, body_dribbling):
                if sock in answered:
                    continue
                try:
                    sock.send(endless[at : at + 1] if sock is not body_dribbling else b"x")
                except OSError:
                    pass  # closed by the server: what the test waits for
            at += 1
            stop.wait(0.2)

    thread = threading.Thread(target=dribble)
    thread.start()
    try:
        # While 41 connections hold on, others are served.
        for colour in ("red", "green", "blue"):
            assert daemon.predict(colour).json()["predictions"][0]["label"] == colour
        for sock in (*idle, *dribbling, body_dribbling):
            status, body, _ = answer(sock)  # returns only once the server closed the connection
            assert status == 408, body
            assert body["error"] == "request not received within server.read_timeout_s (1.0 s)"
    finally:
        stop.set()
        thread.join()
        for sock in (*idle, *dribbling, body_dribbling):
            sock.close()
    assert daemon.predict("red").status_code == 200


def test_a_connection_over_max_connections_gets_a_503_and_the_cap_frees_when_one_closes(
    project: Project, start_daemon
):
    project.save("colours-v1.pt")
    project.config.write_text(colours_yaml(server="  max_connections: 3\n"))
    daemon = start_daemon(project.config)
    # Three half-sent requests; the daemon's own keep-alive client may hold a fourth connection.
    held = [connect(daemon.port) for _ in range(3)]
    for sock in held:
        sock.sendall(HEAD[:20])
    extra = connect(daemon.port)
    extra.sendall(HEAD)  # accepted after the three (accept is first in, first out): over the cap

    status, body, raw = answer(extra)
    assert status == 503
    assert body == {"error": "too many connections: server.max_connections is 3; retry"}
    assert b"retry-after: 1\r\n" in raw.lower()

    held[0].sendall(HEAD[20:])  # the first was within the cap: it is served
    assert held[0].recv(65536).startswith(b"HTTP/1.1 200")
    for sock in (extra, *held):
        sock.close()
    wait_until(lambda: httpx.get(f"{daemon.url}/healthz").status_code == 200, what="a connection to be let in")


@pytest.mark.parametrize(
    ("request_bytes", "status", "message"),
    [
        (b"\x00\x01garbage\r\n\r\n", 400, "invalid HTTP request: Invalid HTTP request received"),
        (b"GET / HTTP/1.1\r\nHost: r\r\nContent-Length: abc\r\n\r\n", 400, "invalid HTTP request"),
        (b"GET / HTTP/1.1\r\nHost: r\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, "invalid HTTP"),
        (b"GET / HTTP/1.1\r\n" + b"X-Junk: " + b"a" * 70_000 + b"\r\n\r\n", 431, "exceed 65536 bytes"),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 431, "request line and headers exceed 65536 bytes"),
    ],
    ids=["not http", "bad content-length", "two content-lengths", "huge header", "huge request line"],
)
def test_requests_the_http_layer_cannot_parse_get_json_errors(daemon, request_bytes: bytes, status: int, message: str):
    with connect(daemon.port) as sock:
        sock.sendall(request_bytes)
        got, body, raw = answer(sock)

    assert got == status
    assert message in body["error"]
    assert b"content-type: application/json" in raw.lower()
    assert daemon.predict("red").status_code == 200
