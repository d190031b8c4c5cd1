"""`reloader serve` and `reloader validate`; errors become one line and an exit code here, nowhere else."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import ConfigError, UnsafeEnvironment

DEFAULT_CONFIG = "config/models.yaml"
logger = logging.getLogger("reloader")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reloader", description=__doc__)
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the models of a config and hot-reload them")
    serve.add_argument("--config", default=DEFAULT_CONFIG, type=Path)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--no-access-log", dest="access_log", action="store_false", default=None)

    validate = commands.add_parser("validate", help="run the validation gate on one checkpoint, offline")
    validate.add_argument("--config", default=DEFAULT_CONFIG, type=Path)
    validate.add_argument("--model", help="model name in the config (default: the default model)")
    validate.add_argument("--json", action="store_true", help="print the report as JSON")
    validate.add_argument("file", type=Path)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from .config import load_config
    from .server import Daemon

    config = load_config(args.config)
    return Daemon(config, host=args.host, port=args.port, access_log=args.access_log).run()


def _validate(args: argparse.Namespace) -> int:
    from .checkpoints import check_environment
    from .config import load_config
    from .optimize import prepare_module
    from .validation import Gate

    check_environment()
    config = load_config(args.config)
    name = args.model or config.default_model
    if name is None or name not in config.models:
        raise ConfigError(f"{config.path}: --model must name one of {sorted(config.models)}, got {name!r}")
    if not args.file.is_file():
        raise ConfigError(f"{args.file}: no such file")
    _, report = Gate(name, config.models[name], prepare_module).run(args.file)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        verdict = "PASSED" if report.passed else "REJECTED"
        print(f"{verdict}: {args.file} for model {name!r} (sha256 {report.sha256}, {report.total_ms:.0f} ms)")
        for check in report.checks:
            print(f"  [{'ok' if check.passed else 'FAIL'}] {check.name:<9} {check.detail} ({check.ms:.1f} ms)")
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .logs import setup_logging

    setup_logging(args.log_format, args.log_level, access_log=getattr(args, "access_log", None) is not False)
    try:
        return _serve(args) if args.command == "serve" else _validate(args)
    except (ConfigError, UnsafeEnvironment) as exc:
        if args.log_format == "json":
            # A log shipper reading --log-format json expects every line, this one too, to be JSON.
            event = "config_rejected" if isinstance(exc, ConfigError) else "unsafe_environment"
            logger.error("%s", exc, extra={"event": event, "error": str(exc)})
        else:
            print(f"reloader: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
