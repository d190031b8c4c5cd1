"""Hostile input, generated: Schemathesis against a live daemon, and Hypothesis on the parsers behind it.

The API fuzz runs every operation of GET /openapi.json against a real daemon on a real socket, with
requests that fit the description and requests that break it, and fails on any 5xx and on any answer the
description does not allow (status code, content type, headers, body). The property tests feed the
config parser and the v2 request parser arbitrary data: each gives a result or raises the project's own
error (ConfigError, an ApiError), never anything else.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import yaml
from conftest import COLOURS, Project, png_bytes
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis import checks
from schemathesis.specs.openapi import checks as openapi_checks

from reloader.config import Config, parse_config
from reloader.config import load_config as load_config_file
from reloader.errors import ApiError, ConfigError, InvalidRequest
from reloader.v2 import InferRequest, parse_infer

# -- the API, fuzzed by Schemathesis -------------------------------------------------------------------

MODEL = "colours"  # the one model the project fixture configures; its first checkpoint is version 1
# Per operation and phase. 18 operations take 10-40 s in all on two cores; RELOADER_FUZZ_EXAMPLES=300 digs deeper.
FUZZ_EXAMPLES = int(os.environ.get("RELOADER_FUZZ_EXAMPLES", "50"))
# What a schemathesis.toml would say; no file, so the test depends on nothing outside it.
FUZZ_CONFIG = {
    "generation": {"mode": "all", "max-examples": FUZZ_EXAMPLES, "database": "none"},
    # Stateful testing follows links between operations that create and use resources; there are none.
    "phases": {"stateful": {"enabled": False}},
    "cache": {"enabled": False},  # no .schemathesis/ folder in the checkout
}
EXCLUDED_CHECKS = [
    # "Data that fits the schema is accepted": JSON Schema cannot say "a decodable image" or "the shape
    # agrees with the number of elements", so a well-typed body of random bytes is rightly a 400.
    checks.positive_data_acceptance,
    # "Data that breaks the schema is rejected": v2 ignores unknown keys and parameters, as Triton does, and
    # top_k=1e999 or a Content-Encoding header of identity with extra spaces may still be served.
    checks.negative_data_rejection,
    # These need authentication, or resources that one operation creates and another deletes: none here.
    openapi_checks.ignored_auth,
    openapi_checks.use_after_free,
    openapi_checks.ensure_resource_availability,
]


@pytest.fixture(autouse=True)
def _nodeid(request: pytest.FixtureRequest) -> None:
    # schemathesis.pytest.from_fixture (4.32) reads and writes `node._nodeid`, which pytest 9.2 no longer
    # has (the id lives in `_id`); giving it one is enough: pytest reports from `_id`, so nothing else changes.
    request.node._nodeid = request.node.nodeid


@pytest.fixture
def live_api(project: Project, start_daemon) -> schemathesis.BaseSchema:
    project.save("colours-v1.pt")
    daemon = start_daemon(project.config)
    document = httpx.get(f"{daemon.url}/openapi.json", timeout=30).json()
    # The served description, plus this project's model as an example name: without one nearly every
    # request to a model route is an unknown-model 404, and the predict and infer paths never run.
    parameters = document["components"]["parameters"]
    parameters["name"]["schema"] = {**parameters["name"]["schema"], "examples": [MODEL]}
    parameters["version"]["schema"] = {**parameters["version"]["schema"], "examples": ["1"]}
    schema = schemathesis.openapi.from_dict(document, config=schemathesis.Config.from_dict(FUZZ_CONFIG))
    schema.config.update(base_url=daemon.url)
    schema.hook("flatmap_path_parameters")(_half_on_the_model)
    return schema


def _half_on_the_model(context: Any, path_parameters: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """In the fuzzing phase, half the cases name the real model (and its live version), half anything."""
    if not path_parameters:
        return st.just(path_parameters)
    real = {**path_parameters, "name": MODEL, **({"version": "1"} if "version" in path_parameters else {})}
    return st.sampled_from([path_parameters, real])


api = schemathesis.pytest.from_fixture("live_api")


@api.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_generated_requests_as_described(case):
    # Runs not_a_server_error (no 5xx), status_code_conformance, content_type_conformance,
    # response_headers_conformance (X-Model-*, Retry-After), response_schema_conformance, and the
    # method checks (another method gets a 405 with Allow).
    case.call_and_validate(excluded_checks=EXCLUDED_CHECKS, timeout=30)


# -- the config parser, fed arbitrary data -------------------------------------------------------------

PROPERTY = settings(
    max_examples=int(os.environ.get("RELOADER_PROPERTY_EXAMPLES", "200")),
    deadline=None,
    database=None,
    # Two shared cores make any example slow now and then; a 3000-deep nesting is a big example on purpose.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(10**30), 10**30), st.floats(), st.text(max_size=20)
)
# Strings that mean something to the config: paths (relative, home, another user's home), factories, buckets.
MEANINGFUL = [
    "",
    ".",
    "/",
    "..",
    "\x00",
    "~",
    "~nosuchuser-reloader/x",
    "golden/red.png",
    "golden",
    "checkpoints/colours",
    "tinynet:colour_net",
    "tinynet:",
    ":colour_net",
    ".tinynet:colour_net",
    "..x:y",
    "resnet18",
    "os:getcwd",
    "s3://",
    "s3://bucket/prefix/",
    "s3://B/x",
    "imagenet",
    "latest",
    "auto",
    "cuda:99",
    "bf16",
    "fp16",
    "compile",
]
VALUES = st.recursive(
    SCALARS | st.sampled_from(MEANINGFUL),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
VALID = {
    "server": {"host": "127.0.0.1", "port": 0, "default_model": MODEL},
    "watch": {"poll": True},
    "models": {
        MODEL: {
            "arch": "tinynet:colour_net",
            "num_classes": 3,
            "labels": list(COLOURS),
            "checkpoints": "checkpoints/colours",
            "preprocess": {"resize": 32, "crop": 32},
            "warmup": {"images": [f"golden/{c}.png" for c in COLOURS], "expect": list(COLOURS)},
        }
    },
}
_MODEL_KEYS = (
    "arch",
    "num_classes",
    "labels",
    "checkpoints",
    "version",
    "preprocess",
    "warmup",
    "batch",
    "optimize",
    "precision",
    "device",
    "fidelity",
    "evaluation",
    "canary",
    "max_checkpoint_bytes",
    "signature",
    "unknown",
)
# Where an arbitrary value goes in an otherwise valid config: each key the schema knows, at every level.
SLOTS = [
    ("server",),
    ("watch",),
    ("models",),
    ("cache_dir",),
    ("cache_keep",),
    ("path",),
    ("digest",),
    ("unknown",),
    *(("server", key) for key in ("host", "port", "max_body_bytes", "default_model", "request_timeout_s")),
    *(("watch", key) for key in ("poll", "poll_interval", "settle_ms", "config_debounce_ms")),
    ("models", MODEL),
    ("models", "other"),
    *(("models", MODEL, key) for key in _MODEL_KEYS),
    *(("models", MODEL, "preprocess", key) for key in ("resize", "crop", "max_pixels", "mean", "std")),
    *(("models", MODEL, "warmup", key) for key in ("images", "expect")),
    *(("models", MODEL, "batch", key) for key in ("max_size", "max_wait_ms", "queue_size")),
    *(("models", MODEL, "evaluation", key) for key in ("images", "min_accuracy", "max_regression", "files")),
    *(("models", MODEL, "canary", key) for key in ("requests", "min_agreement", "max_wait_s", "on_timeout")),
]


def with_value(data: dict[str, Any], slot: tuple[str, ...], value: Any) -> dict[str, Any]:
    """`data` with `value` at `slot` (a section that is not a mapping becomes one on the way)."""
    node = data
    for key in slot[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[slot[-1]] = value
    return data


@st.composite
def near_valid_configs(draw: st.DrawFn) -> Any:
    """A valid config with one to three of its keys (or sections) replaced by arbitrary data."""
    data = copy.deepcopy(VALID)
    for slot in draw(st.lists(st.sampled_from(SLOTS), min_size=1, max_size=3)):
        with_value(data, slot, draw(st.sampled_from(MEANINGFUL) | st.lists(st.sampled_from(MEANINGFUL)) | VALUES))
    return data


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's layout (golden images, a checkpoints folder), shared by every example."""
    root = tmp_path_factory.mktemp("fuzzed-config")
    (root / "golden").mkdir()
    for colour in COLOURS:
        (root / "golden" / f"{colour}.png").write_bytes(png_bytes(colour))
    (root / "checkpoints" / MODEL).mkdir(parents=True)
    return root


def parses_or_refuses(data: Any, base_dir: Path) -> None:
    try:
        config = parse_config(data, base_dir=base_dir, source="fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml: ")
    else:
        assert isinstance(config, Config) and config.models


def test_the_valid_config_the_property_tests_start_from_is_valid(config_dir: Path):
    assert parse_config(VALID, base_dir=config_dir, source="fuzz.yaml").models[MODEL].num_classes == 3


def test_every_meaningful_string_in_every_key_gives_a_config_or_a_config_error(config_dir: Path):
    # Exhaustive where random draws would be rare: each of these strings, alone and as a list, at each slot.
    for slot in SLOTS:
        for value in MEANINGFUL:
            parses_or_refuses(with_value(copy.deepcopy(VALID), slot, value), config_dir)
            parses_or_refuses(with_value(copy.deepcopy(VALID), slot, [value]), config_dir)


@PROPERTY
@given(data=VALUES | near_valid_configs())
# What it found (each an exception other than ConfigError before the fix): an evaluation without a path
# (AttributeError), another user's home (RuntimeError), a relative module as the factory (TypeError).
@example(data=with_value(copy.deepcopy(VALID), ("models", MODEL, "evaluation"), {"images": None}))
@example(data=with_value(copy.deepcopy(VALID), ("cache_dir",), "~nosuchuser-reloader/cache"))
@example(data=with_value(copy.deepcopy(VALID), ("models", MODEL, "arch"), ".tinynet:colour_net"))
def test_any_parsed_yaml_gives_a_config_or_a_config_error(config_dir: Path, data: Any):
    parses_or_refuses(data, config_dir)


# YAML's own syntax, to build text that is almost YAML: indentation, flow collections, anchors, tags, merges.
FRAGMENTS = st.sampled_from(
    [
        "\n",
        "  ",
        "- ",
        ": ",
        ", ",
        "[",
        "]",
        "{",
        "}",
        "&a ",
        "*a",
        "<<: *a",
        "? ",
        "---\n",
        "...\n",
        "#",
        '"',
        "'",
        "|\n",
        ">\n",
        "\t",
        "%YAML 1.1\n",
        "!!binary ",
        "!!set ",
        "!!timestamp ",
        "!!python/object:os.getcwd ",
        "!local ",
        "models:\n",
        "  colours:\n",
        "    arch: tinynet:colour_net\n",
        "    num_classes: 3\n",
        "\ufeff",
    ]
)
NESTED = st.builds(
    lambda depth, pair: pair[0] * depth + pair[1] * depth,
    st.integers(min_value=1, max_value=3000),
    st.sampled_from([("[", "]"), ("{a: ", "}"), ("- ", ""), ("&x [", "]")]),
)
YAML_TEXT = (
    st.text(max_size=200)
    | st.lists(FRAGMENTS | st.text(max_size=5), max_size=40).map("".join)
    | VALUES.map(lambda v: yaml.safe_dump(v, allow_unicode=True))
    | near_valid_configs().map(yaml.safe_dump)
    | NESTED
)


@PROPERTY
@given(raw=YAML_TEXT.map(lambda text: text.encode("utf-8", "surrogatepass")) | st.binary(max_size=200))
# What it found: nesting deeper than PyYAML's recursion (RecursionError), and scalars its constructors
# cannot read (AttributeError, ValueError, IndexError, KeyError), none of them a YAMLError before the fix.
@example(raw=b"[" * 2000)
@example(raw=b"a: !!timestamp x")
@example(raw=b"a: !!int _")
@example(raw=b"a: !!bool x")
@example(raw=b"a: " + b"9" * 5000)
def test_any_config_file_gives_a_config_or_a_config_error(config_dir: Path, raw: bytes):
    fd, name = tempfile.mkstemp(suffix=".yaml", dir=config_dir)
    path = Path(name)
    try:
        os.write(fd, raw)
        os.close(fd)
        try:
            config = load_config_file(path)
        except ConfigError as exc:
            assert str(exc).startswith(f"{path}: ")
        else:
            assert config.path == path
    finally:
        path.unlink()


# -- the v2 request parser, fed arbitrary bodies and header lengths ------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
IMAGE_ELEMENTS = st.lists(st.binary(max_size=12), max_size=4)


def _either(valid: Any) -> st.SearchStrategy[Any]:
    return st.just(valid) | JSON_VALUES


@st.composite
def infer_bodies(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A request that is right or wrong in any of its parts: JSON or binary, with a fitting or odd header length."""
    images = draw(IMAGE_ELEMENTS)
    binary = draw(st.booleans())
    framed = b"".join(struct.pack("<I", len(i)) + i for i in images)
    tensor: dict[str, Any] = {
        "name": draw(_either("IMAGE")),
        "datatype": draw(_either("BYTES")),
        "shape": draw(_either([len(images)]) | st.lists(st.integers(min_value=-2, max_value=2**70), max_size=3)),
    }
    if binary:
        tensor["parameters"] = {"binary_data_size": draw(_either(len(framed)) | st.integers())}
    else:
        tensor["data"] = draw(_either([base64.b64encode(i).decode() for i in images]))
    doc: dict[str, Any] = {"inputs": draw(_either([tensor]) | st.lists(_either(tensor), max_size=3))}
    for key, valid in (
        ("outputs", [{"name": "PROBABILITIES", "parameters": {"classification": 2, "binary_data": binary}}]),
        ("parameters", {"binary_data_output": binary}),
        ("id", "request-1"),
    ):
        if draw(st.booleans()):
            doc[key] = draw(_either(valid))
    head = json.dumps(doc).encode()
    if not binary:
        return head, draw(st.none() | st.just(str(len(head))))
    tail = draw(st.just(framed) | st.binary(max_size=40))
    length = draw(st.just(len(head)) | st.integers(min_value=-3, max_value=len(head) + len(tail) + 3))
    return head + tail, str(length)


HEADER_LENGTHS = (
    st.none()
    | st.text(max_size=25)
    | st.integers().map(str)
    | st.sampled_from(["", "0", "-0", "+1", " 1", "1 ", "1_0", "١", "²", "9" * 19, "9" * 5000, "0x10"])
)


@PROPERTY
@given(
    request=infer_bodies() | st.tuples(st.binary(max_size=300), HEADER_LENGTHS),
    max_images=st.integers(min_value=1, max_value=8),
)
def test_any_infer_body_gives_a_request_or_an_invalid_request(request: tuple[bytes, str | None], max_images: int):
    body, header_length = request
    try:
        parsed = parse_infer(body, header_length, max_images)
    except ApiError as exc:
        assert isinstance(exc, InvalidRequest) and exc.status == 400, exc
        assert str(exc)
    else:
        assert isinstance(parsed, InferRequest)
        assert 1 <= len(parsed.images) <= max_images
        assert len(parsed.outputs) == 1
        assert all(isinstance(image, bytes) for image in parsed.images)
