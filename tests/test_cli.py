"""`reloader validate` exit codes and start-up errors, run as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import Project, colours_yaml, reloader_cmd, subprocess_env
from tinynet import colour_state_dict

from reloader.cli import SERVING_SPIN_COUNT


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(reloader_cmd(*args), env=subprocess_env(), capture_output=True, text=True, timeout=120)


def test_validate_exits_0_for_a_checkpoint_that_passes(project: Project):
    good = project.stage("good.pt")

    result = run("validate", "--config", str(project.config), "--model", "colours", str(good))

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("PASSED")
    for check in ("load", "structure", "finite", "warmup"):
        assert f"[ok] {check}" in result.stdout


def test_validate_exits_1_and_prints_the_report_for_a_rejected_checkpoint(project: Project):
    bad = project.stage("bad.pt", colour_state_dict(permute=(2, 1, 0)))

    text = run("validate", "--config", str(project.config), "--model", "colours", str(bad))
    as_json = run("validate", "--config", str(project.config), "--json", str(bad))

    assert text.returncode == 1
    assert "REJECTED" in text.stdout
    assert "[FAIL] warmup" in text.stdout
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["passed"] is False
    assert report["reason"].startswith("warmup: red.png: expected 'red', got 'blue'")
    assert [c["name"] for c in report["checks"]] == ["load", "structure", "finite", "warmup"]
    assert len(report["sha256"]) == 64


def test_validate_exits_2_on_usage_and_config_errors(project: Project):
    good = project.stage("good.pt")
    broken = project.root / "broken.yaml"
    broken.write_text(colours_yaml().replace("num_classes: 3", "num_classes: -3"))

    unknown_model = run("validate", "--config", str(project.config), "--model", "nope", str(good))
    bad_config = run("validate", "--config", str(broken), str(good))
    missing_file = run("validate", "--config", str(project.config), str(project.root / "absent.pt"))
    no_file_argument = run("validate", "--config", str(project.config))

    assert unknown_model.returncode == 2
    assert "--model must name one of ['colours'], got 'nope'" in unknown_model.stderr
    assert bad_config.returncode == 2
    assert "models.colours.num_classes: must be > 0, got -3" in bad_config.stderr
    assert missing_file.returncode == 2
    assert no_file_argument.returncode == 2


def test_a_bad_config_at_startup_exits_non_zero_with_one_line_and_no_traceback(project: Project):
    project.write_config(colours_yaml().replace("num_classes: 3", "num_classes: -3"))

    result = run("serve", "--config", str(project.config))

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"reloader: error: {project.config}: models.colours.num_classes: must be > 0, got -3"
    ]


def test_version_prints_reloaders_version_and_torchs():
    from importlib.metadata import version

    import reloader

    result = run("--version")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"reloader {reloader.__version__} (torch {version('torch')})"


def test_help_speaks_to_the_user_not_to_the_developer():
    result = run("--help")

    assert result.returncode == 0, result.stderr
    assert "nowhere else" not in result.stdout  # the module docstring, for whoever edits cli.py
    assert "hot-reload" in result.stdout
    for command in ("serve", "validate"):
        assert f"\n    {command} " in result.stdout, f"{command} is not listed as a command"
        assert f"reloader {command} " in result.stdout, f"no example of {command}"
    assert "0 the checkpoint passes, 1 it is rejected" in result.stdout


def test_validate_prints_every_precision_form_it_tried_under_auto(project: Project):
    project.write_config(colours_yaml().replace("    preprocess:", "    precision: auto\n    preprocess:"))
    good = project.stage("good.pt")

    result = run("validate", "--config", str(project.config), str(good))

    assert result.returncode == 0, result.stderr
    assert "[ok] fidelity" in result.stdout
    assert "the forms tried against fp32:" in result.stdout
    table = result.stdout.split("the forms tried against fp32:")[1]
    assert "precision form     device agreement" in table and "bf16" in table


def test_serve_shortens_the_openmp_spin_unless_the_operator_chose_one():
    """`reloader serve` sets GOMP_SPINCOUNT before torch loads (cli.spin_briefly; what it buys: cli.py)."""
    code = "import os, reloader.cli as c; c.spin_briefly(); print(os.environ.get('GOMP_SPINCOUNT'))"

    def spin_count(before: str = "", **env: str) -> str:
        clean = {k: v for k, v in subprocess_env().items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
        argv = [sys.executable, "-c", before + code]
        done = subprocess.run(argv, env={**clean, **env}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert spin_count() == SERVING_SPIN_COUNT
    assert spin_count(GOMP_SPINCOUNT="5") == "5"
    assert spin_count(OMP_WAIT_POLICY="PASSIVE") == "None"
    assert spin_count("import torch; ") == "None"  # too late: OpenMP read its environment as torch loaded


HEAPS = """
import ctypes, os, re, tempfile, threading

def heaps() -> int:
    \"\"\"glibc's malloc arenas in use once 4 threads have allocated at the same time (malloc_info's heaps).\"\"\"
    together = threading.Barrier(4)

    def allocate() -> None:
        held = [ctypes.create_string_buffer(4096) for _ in range(64)]  # over pymalloc's 512 bytes: malloc's
        together.wait(60)

    threads = [threading.Thread(target=allocate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    libc = ctypes.CDLL(None)
    libc.fdopen.restype = ctypes.c_void_p
    with tempfile.TemporaryFile() as f:
        stream = ctypes.c_void_p(libc.fdopen(os.dup(f.fileno()), b"w"))
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        f.seek(0)
        return len(re.findall(rb"<heap nr=", f.read()))
"""


def test_serve_allocates_from_one_malloc_arena_unless_the_operator_chose_how_many(project: Project):
    """`reloader serve` has glibc use one arena for every thread (memory.one_arena, which says what it buys); the
    daemon is replaced by one that counts the arenas its threads allocate from."""
    project.write_config(colours_yaml())
    serve = (
        "import reloader.server\n"
        "class Counting:\n"
        "    def __init__(self, *args, **kwargs): pass\n"
        "    def run(self): print(heaps()); return 0\n"
        "reloader.server.Daemon = Counting\n"
        "import reloader.cli\n"
        f"raise SystemExit(reloader.cli.main(['serve', '--config', {str(project.config)!r}]))\n"
    )

    def arenas(code: str, **env: str) -> int:
        clean = {k: v for k, v in subprocess_env().items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
        done = subprocess.run(
            [sys.executable, "-c", HEAPS + code], env={**clean, **env}, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip().splitlines()[-1])

    assert arenas("print(heaps())") > 1  # glibc's default: threads get arenas of their own
    assert arenas(serve) == 1
    assert arenas(serve, MALLOC_ARENA_MAX="3") > 1
