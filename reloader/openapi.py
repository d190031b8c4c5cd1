"""`GET /openapi.json`: the OpenAPI 3.1 description of every route, from reloader/static/openapi.yaml.

The description lives in YAML, next to the status page, because it is mostly schemas and a file reads
better than nested dicts; it ships in the wheel. tests/test_openapi.py checks that it lists exactly the
app's routes and the values the code uses (model states, file statuses, v2 names), and tests/test_fuzz.py
runs Schemathesis against a live daemon and fails on any answer it does not describe.
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

import yaml
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import __version__


def load() -> dict[str, Any]:
    """The description as a fresh dict, with the package's version."""
    document = yaml.safe_load(files("reloader").joinpath("static/openapi.yaml").read_text(encoding="utf-8"))
    document["info"]["version"] = __version__
    return document


# Read and rendered once, at import.
DOCUMENT = load()
BODY = json.dumps(DOCUMENT, separators=(",", ":")).encode()


async def openapi(request: Request) -> Response:
    return Response(BODY, media_type="application/json")


def route() -> Route:
    """The route, for the daemon's app (server.py), as Metrics.route() is."""
    return Route("/openapi.json", openapi)
