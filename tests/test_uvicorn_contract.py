"""The parts of uvicorn.Server that reloader/server.py's `_Server` overrides or reads, which are not public API.

`_Server` overrides `capture_signals` (exit 0 on SIGTERM, SIGHUP), `handle_exit`, `startup` (systemd
READY=1) and `on_tick` (watchdog pings), and reads `should_exit`, `force_exit` and `started`. uvicorn
may rename or reshape any of them in a minor release, and nothing else would notice: an override
that uvicorn no longer calls is dead code that still type-checks. When a test here fails, read that
uvicorn release's `server.py`, adapt `_Server`, then move the uvicorn bound in pyproject.toml.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from uvicorn.server import Server

SERVER_PY = Path(__file__).resolve().parent.parent / "reloader" / "server.py"

ACTION = (
    "reloader/server.py's _Server relies on it. Read uvicorn {version}'s uvicorn/server.py, adapt _Server "
    "to the new hook, and move the uvicorn bound in pyproject.toml; or pin uvicorn back to the series "
    "pyproject.toml names."
)

# hook -> (parameter names after self, how _Server overrides it)
HOOKS = {
    "capture_signals": ((), "context manager"),
    "handle_exit": (("sig", "frame"), "plain method"),  # installed with signal.signal: called (signum, frame)
    "startup": (("sockets",), "coroutine"),  # uvicorn calls startup(sockets=...): the name matters
    "on_tick": (("counter",), "coroutine"),
}


def changed(hook: str, what: str) -> str:
    return f"uvicorn {uvicorn.__version__} changed Server.{hook}: {what}. " + ACTION.format(version=uvicorn.__version__)


def _kind(function: object) -> str:
    if inspect.iscoroutinefunction(function):
        return "coroutine"
    # contextlib.contextmanager wraps a generator function and keeps it as __wrapped__.
    if inspect.isgeneratorfunction(getattr(function, "__wrapped__", None)):
        return "context manager"
    return "plain method"


def _declared_kind(method: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    if isinstance(method, ast.AsyncFunctionDef):
        return "coroutine"
    decorators = {ast.unparse(d) for d in method.decorator_list}
    return "context manager" if decorators & {"contextlib.contextmanager", "contextmanager"} else "plain method"


async def _app(scope: dict, receive: object, send: object) -> None:
    raise AssertionError("no request is made")


def _server() -> Server:
    return uvicorn.Server(uvicorn.Config(_app, host="127.0.0.1", port=0, lifespan="off", log_config=None))


def test_the_hooks_server_py_overrides_still_exist_with_the_same_shape():
    problems = []
    for hook, (params, kind) in HOOKS.items():
        function = getattr(Server, hook, None)
        if not callable(function):
            problems.append(changed(hook, "it is gone"))
            continue
        names = tuple(inspect.signature(function).parameters)[1:]
        if names != params:
            problems.append(changed(hook, f"its parameters are now {names}, _Server's override takes {params}"))
        if _kind(function) != kind:
            problems.append(changed(hook, f"it is now a {_kind(function)}, _Server overrides it as a {kind}"))

    assert not problems, "\n".join(problems)


def test_the_attributes_server_py_reads_still_exist():
    server = _server()

    for attribute in ("should_exit", "force_exit", "started"):
        assert isinstance(getattr(server, attribute, None), bool), changed(
            attribute, "Server() no longer sets it to a bool in __init__"
        )


def test_server_py_overrides_match_uvicorns_signatures():
    # Read from the source, not imported: server.py imports the whole daemon (torch included).
    tree = ast.parse(SERVER_PY.read_text(encoding="utf-8"))
    [cls] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "_Server"]
    methods = {n.name: n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}

    for hook, (params, kind) in HOOKS.items():
        assert hook in methods, f"_Server no longer overrides {hook}: update HOOKS in this test"
        method = methods[hook]
        names = tuple(a.arg for a in [*method.args.posonlyargs, *method.args.args, *method.args.kwonlyargs])[1:]
        assert names == params, f"_Server.{hook} takes {names}, uvicorn.Server.{hook} takes {params}"
        ours = _declared_kind(method)
        assert ours == kind, f"_Server.{hook} is a {ours}, uvicorn.Server.{hook} a {kind}"


def test_uvicorn_still_calls_the_hooks_when_it_serves():
    calls: list[object] = []

    class Recording(Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            calls.append("capture_signals")
            with super().capture_signals():
                yield

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            calls.append(("startup", self.started))

        async def on_tick(self, counter: int) -> bool:
            calls.append(("on_tick", counter))
            self.should_exit = True  # what handle_exit sets: the next tick ends the loop, then shutdown runs
            return await super().on_tick(counter)

    server = Recording(_server().config)
    server.run()  # as Daemon.run does, on this (the main) thread, so capture_signals installs handlers

    assert "capture_signals" in calls, changed("capture_signals", "Server.run() no longer enters it")
    assert ("startup", True) in calls, changed("startup", "Server.run() no longer awaits it, or started stays False")
    assert ("on_tick", 0) in calls, changed("on_tick", "Server.run() no longer awaits it once the server is up")
    assert calls.index("capture_signals") < calls.index(("startup", True)) < calls.index(("on_tick", 0)), changed(
        "capture_signals", f"the hooks now run in another order: {calls}"
    )


def test_uvicorn_re_raises_a_caught_signal_only_from_the_capture_signals_server_py_replaces():
    # uvicorn re-raises SIGTERM after a graceful shutdown, which would make the exit code 143, not 0;
    # _Server's capture_signals does not, which only helps while that is where uvicorn does it.
    callers = ("run", "serve", "_serve", "main_loop", "shutdown")
    assert any(hasattr(Server, caller) for caller in callers), changed("run", f"none of {callers} exists any more")
    for caller in callers:
        function = getattr(Server, caller, None)
        if function is None:
            continue
        assert "raise_signal" not in inspect.getsource(function), changed(
            caller, "it now re-raises the signal that stopped the server itself (exit 143 on SIGTERM, not 0)"
        )


def test_the_protocol_hooks_connections_py_overrides_still_exist():
    """reloader/connections.py subclasses uvicorn's httptools protocol; these are what it overrides or reads."""
    from uvicorn.protocols.http import httptools_impl

    protocol = httptools_impl.HttpToolsProtocol
    hooks = (
        "connection_made", "connection_lost", "data_received", "on_message_begin", "on_url", "on_header",
        "on_headers_complete", "on_message_complete", "on_response_complete", "send_400_response",
    )  # fmt: skip
    missing = [hook for hook in hooks if not callable(getattr(protocol, hook, None))]
    assert not missing, changed("HttpToolsProtocol", f"no {missing}").replace("server.py's _Server", "connections.py")
    assert isinstance(httptools_impl.STATUS_LINE[408], bytes)
    # A connection over the cap gets another app by swapping `self.app` around on_headers_complete.
    source = inspect.getsource(protocol.on_headers_complete)
    assert "app = self.app" in source, "on_headers_complete no longer starts the app it finds in self.app"
    for name in ("cycle", "connections", "server_state", "loop", "transport"):
        assert f"self.{name}" in inspect.getsource(protocol), name
