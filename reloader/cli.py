"""`reloader serve` and `reloader validate`; errors become one line and an exit code here, nowhere else."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConfigError, UnsafeEnvironment
from .report import ValidationReport

DEFAULT_CONFIG = "config/models.yaml"
logger = logging.getLogger("reloader")

# What `reloader --help` says; the module docstring above is for whoever edits this file.
DESCRIPTION = """\
Serve PyTorch image classifiers over HTTP and hot-reload them from the filesystem.

Drop a new checkpoint into a model's checkpoints folder, or edit the config, and
reloader checks the new weights (they load, fit the architecture, are finite and
label the warm-up images as expected) before it swaps them in. Until then, and
whenever a checkpoint is rejected, the previous version keeps serving."""

EPILOG = """\
examples:
  reloader serve --config config/models.yaml
  reloader --log-format json serve --config /etc/reloader/models.yaml --port 9000
  reloader validate --config config/models.yaml --model shapes checkpoints/shapes/shapes-epoch002.pt

exit codes of validate: 0 the checkpoint passes, 1 it is rejected (the report says
why), 2 a usage or config error.

Run `reloader serve --help` or `reloader validate --help` for a command's options."""

SERVE_DESCRIPTION = """\
Serve every model in the config, then watch the checkpoints folders and the config:
a new or changed checkpoint goes live once it passes the validation gate. SIGHUP
re-reads the config and rescans the folders. SIGTERM or Ctrl-C finishes the
requests in flight and exits 0 (a second one exits at once); an invalid config
at start exits 2."""

VALIDATE_DESCRIPTION = """\
Run the validation gate on one checkpoint, offline, without serving it: the same
checks serve runs before a swap (load, structure, finite, warmup, and fidelity and
evaluation where the config asks). Handy in a training pipeline's CI.

--baseline FILE scores FILE on the model's evaluation set first and judges the
checkpoint against it, as the daemon judges a candidate against the live version
(max_regression), then prints the accuracy table.

exit codes: 0 the checkpoint passes, 1 it is rejected (the report says why),
2 a usage or config error."""


def _versions() -> str:
    """`reloader X (torch Y)`: torch's version from its installed metadata, so --version stays instant."""
    from importlib import metadata

    try:
        torch = f" (torch {metadata.version('torch')})"
    except metadata.PackageNotFoundError:
        torch = ""
    return f"reloader {__version__}{torch}"


class _VersionAction(argparse.Action):
    """--version, looked up only when asked for."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(_versions())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="reloader", description=DESCRIPTION, epilog=EPILOG, formatter_class=raw)
    parser.add_argument("--version", action=_VersionAction, help="print the versions of reloader and torch, and exit")
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="json: one JSON object per line (default: text)"
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    commands = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=description, formatter_class=raw)
        sub.add_argument(
            "--config", default=DEFAULT_CONFIG, type=Path, help=f"the config file (default: {DEFAULT_CONFIG})"
        )
        return sub

    serve = command("serve", "serve the models of a config and hot-reload them", SERVE_DESCRIPTION)
    serve.add_argument("--host", help="address to listen on (default: the config's server.host)")
    serve.add_argument("--port", type=int, help="port to listen on (default: the config's server.port)")
    serve.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        default=None,
        help="no log line per request (default: the config's server.access_log)",
    )

    validate = command("validate", "run the validation gate on one checkpoint, offline", VALIDATE_DESCRIPTION)
    validate.add_argument("--model", help="model name in the config (default: the default model)")
    validate.add_argument("--json", action="store_true", help="print the report as JSON")
    validate.add_argument(
        "--baseline", type=Path, help="compare with this checkpoint on the evaluation set, as with the live version"
    )
    validate.add_argument("file", type=Path, help="the checkpoint file to check")
    return parser


# How long (in busy-wait loops) the threads of a forward's OpenMP team spin for the next layer before they sleep:
# GNU OpenMP's default spins about 9 ms after a pass (300,000 loops on the Zen 4 EPYC), at the priority of serving,
# on a core the decoding of the next batch needs. 10,000 loops (about 0.3 ms there) still spans the gaps between
# one pass's layers. Measured with serving's one team (compute.py), c=16: 49.0 against 49.2 img/s (default spin:
# 37.6 against 50.8). An operator's GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.
SERVING_SPIN_COUNT = "10000"


def spin_briefly() -> None:
    """Set GOMP_SPINCOUNT for serving, unless set: it is read once, when torch loads its OpenMP (so not in a
    process that has loaded torch already)."""
    if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SERVING_SPIN_COUNT)


def _serve(args: argparse.Namespace) -> int:
    spin_briefly()
    from .config import load_config
    from .memory import one_arena
    from .server import Daemon

    one_arena()
    config = load_config(args.config)
    return Daemon(config, host=args.host, port=args.port, access_log=args.access_log).run()


def _validate(args: argparse.Namespace) -> int:
    from .checkpoints import check_environment
    from .config import load_config
    from .gate import Gate
    from .optimize import prepare_module

    check_environment()
    config = load_config(args.config)
    name = args.model or config.default_model
    if name is None or name not in config.models:
        raise ConfigError(f"{config.path}: --model must name one of {sorted(config.models)}, got {name!r}")
    for path in (args.file, args.baseline):
        if path is not None and not path.is_file():
            raise ConfigError(f"{path}: no such file")
    gate = Gate(name, config.models[name], prepare_module)
    baseline = None
    if args.baseline is not None:
        if gate.evaluation is None:
            raise ConfigError(f"{config.path}: models.{name} has no evaluation set, which --baseline compares on")
        judged = gate.judge(args.baseline)
        if judged.module is None:
            raise ConfigError(f"{args.baseline}: the baseline fails the gate itself: {judged.report.reason}")
        baseline = gate.score(judged.module)
        del judged
    report = gate.judge(args.file, live=baseline).report
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        verdict = "PASSED" if report.passed else "REJECTED"
        print(f"{verdict}: {args.file} for model {name!r} (sha256 {report.sha256}, {report.total_ms:.0f} ms)")
        for check in report.checks:
            print(f"  [{'ok' if check.passed else 'FAIL'}] {check.name:<9} {check.detail} ({check.ms:.1f} ms)")
        _print_variants(report)
        _print_evaluation(report, "baseline" if baseline is not None else None)
    return 0 if report.passed else 1


def _print_evaluation(report: ValidationReport, against: str | None) -> None:
    result = report.evaluation
    if result is None:
        return
    print(f"  evaluation on {result.images} images: top-1 recall per label, then accuracy")
    print(f"    {'label':<16} {'candidate':>9}" + (f" {against:>9}   change" if against else ""))
    rows = [(label, recall, (result.live_recall or {}).get(label)) for label, recall in result.recall.items()]
    for label, ours, theirs in [*rows, ("accuracy", result.accuracy, result.live_accuracy)]:
        line = f"    {label:<16} {ours:>9.3f}"
        if against and theirs is not None:
            line += f" {theirs:>9.3f} {ours - theirs:>+8.3f}"
        print(line)


def _print_variants(report: ValidationReport) -> None:
    if not report.variants:
        return
    print(f"  precision {report.precision} on {report.device}; the forms tried against fp32:")
    print("    precision form     device agreement  max dp   img/s      ms")
    for v in report.variants:
        agreement = "-" if v.agreement is None else f"{v.agreement:.3f}"
        delta = "-" if v.max_prob_delta is None else f"{v.max_prob_delta:.4f}"
        speed = "-" if v.img_s is None else f"{v.img_s:.1f}"
        serves = (v.precision, v.form) == (report.precision, report.form)
        verdict = "serves" if serves else "kept" if v.passed else v.detail
        row = f"{v.precision:<9} {v.form:<8} {v.device:<6} {agreement:>9} {delta:>7} {speed:>7} {v.ms:>7.0f}"
        print(f"    {row}  {verdict}")


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
