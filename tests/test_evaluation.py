"""The evaluation check: accuracy on a labelled set, with a floor and a bound on regression against the live version."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from conftest import Project, colours_yaml, reloader_cmd, sha256, subprocess_env
from PIL import Image
from tinynet import colour_state_dict

from reloader.config import load_config
from reloader.errors import ConfigError
from reloader.gate import Gate
from reloader.optimize import prepare_module

# Muted colours: one channel leads by 30-90 levels. The golden images are saturated (230 against 20).
MUTED = [(110 + 5 * i, 118, 104 + 3 * i) for i in range(4)]
MAIN = [150, 165, 180, 195]


def biased(red_bias: float) -> dict:
    """Right on every saturated golden image; with a bias towards red, wrong on more muted greens and blues.

    Scores on the set below: 0 -> 1.000, 4 -> 0.917 (11 of 12), 6 -> 0.417 (5 of 12)."""
    state = colour_state_dict()
    state["fc.bias"] = torch.tensor([red_bias, 0.0, 0.0])
    return state


def write_set(folder: Path) -> Path:
    for channel, label in enumerate(("red", "green", "blue")):
        (folder / label).mkdir(parents=True)
        for i, (base, main) in enumerate(zip(MUTED, MAIN, strict=True)):
            rgb = list(base)
            rgb[channel] = main
            Image.new("RGB", (40, 40), tuple(rgb)).save(folder / label / f"{i}.png")
    return folder


def with_evaluation(project: Project, min_accuracy: float = 0.3, max_regression: float = 0.05, **kw: str) -> None:
    write_set(project.root / "eval")
    evaluation = (
        "    evaluation:\n"
        "      images: eval\n"
        f"      min_accuracy: {min_accuracy}\n"
        f"      max_regression: {max_regression}\n"
    )
    project.write_config(colours_yaml(extra_model=evaluation, **kw))


def test_a_better_checkpoint_is_promoted_and_one_worse_on_the_set_is_rejected_though_it_passes_the_golden_images(
    project: Project, start_daemon
):
    with_evaluation(project)
    first = project.save("colours-v1.pt", biased(4.0))
    daemon = start_daemon(project.config)
    status = daemon.wait_live(first)
    assert status["live"]["report"]["evaluation"]["accuracy"] == pytest.approx(0.917, abs=1e-3)

    better = project.save("colours-v2.pt", biased(0.0))
    status = daemon.wait_live(better)
    evaluation = status["live"]["report"]["evaluation"]
    assert evaluation["accuracy"] == 1.0
    assert evaluation["live_accuracy"] == pytest.approx(0.917, abs=1e-3)
    assert evaluation["recall"] == {"red": 1.0, "green": 1.0, "blue": 1.0}
    check = next(c for c in status["live"]["report"]["checks"] if c["name"] == "evaluation")
    assert check["detail"] == "accuracy 1.000 on 12 images (live 0.917)"

    worse = project.save("colours-v3.pt", biased(6.0))
    rejected = daemon.wait_file(worse, "rejected")
    assert rejected["reason"] == "evaluation: accuracy 0.417 < live 1.000 - 0.05"
    assert daemon.live_sha() == sha256(better)
    event = next(e for e in daemon.status()["events"] if e["result"] == "rejected")
    assert "evaluation" in event["timings_ms"]
    assert daemon.predict("red").json()["version"] == 2


def test_a_checkpoint_below_min_accuracy_is_rejected_with_both_numbers(project: Project):
    with_evaluation(project, min_accuracy=0.9)
    gate = Gate("colours", load_config(project.config).models["colours"], prepare_module)

    judged = gate.judge(project.stage("colours-v1.pt", biased(6.0)))

    assert not judged.passed
    assert judged.report.reason == "evaluation: accuracy 0.417 < min_accuracy 0.900"
    assert judged.report.evaluation is not None and judged.report.evaluation.recall["red"] == 1.0
    assert [c.name for c in judged.report.checks][-2:] == ["warmup", "evaluation"]


def test_the_live_score_is_computed_once_per_version_and_set(project: Project, monkeypatch):
    with_evaluation(project)
    config = load_config(project.config).models["colours"]
    gate = Gate("colours", config, prepare_module)
    live = gate.judge(project.stage("colours-v1.pt", biased(4.0)))
    calls = []
    real = gate.evaluation.score
    monkeypatch.setattr(gate.evaluation, "score", lambda *a: calls.append(1) or real(*a))

    from reloader.events import EventBus
    from reloader.registry import LiveModel, Registry
    from reloader.worker import ModelWorker, Shared

    registry = Registry()
    report = live.report
    path = project.root / "v1.pt"
    registry.swap(LiveModel("colours", config, 1, report.sha256, path, live.module, live.preprocessor, report))
    worker = ModelWorker("colours", config, _NoSource(), Shared(registry, EventBus()))
    first = worker._live_score(gate, config)
    again = worker._live_score(gate, config)
    assert first is again and first.accuracy == pytest.approx(0.917, abs=1e-3)
    assert calls == []  # the live version's own gate run scored it on this very set


def test_a_live_version_that_cannot_run_the_new_definitions_images_sets_no_bar_and_the_pass_goes_on(
    project: Project, caplog
):
    """Its definition moved (here: the crop) and the live module takes only its old images: scoring it raised
    out of the pass, so no candidate was judged under the new config at all."""
    with_evaluation(project)
    config = load_config(project.config).models["colours"]
    gate = Gate("colours", config, prepare_module)
    old = config.model_copy(update={"preprocess": config.preprocess.model_copy(update={"crop": 8, "resize": 8})})
    only_8px = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)).eval()

    from reloader.events import EventBus
    from reloader.registry import LiveModel, Registry
    from reloader.worker import ModelWorker, Shared

    registry = Registry()
    live = gate.judge(project.stage("colours-v1.pt", biased(4.0)))
    report = live.report
    path = project.root / "v1.pt"
    registry.swap(LiveModel("colours", old, 1, report.sha256, path, only_8px, live.preprocessor, report))
    worker = ModelWorker("colours", config, _NoSource(), Shared(registry, EventBus()))

    assert worker._live_score(gate, config) is None
    assert "the live version cannot be scored on this definition's evaluation set (RuntimeError" in caplog.text
    judged = gate.judge(project.stage("colours-v2.pt", biased(0.0)), live=worker._live_score(gate, config))
    assert judged.passed, judged.report.reason


class _NoSource:
    """The worker under test never runs a pass: it only needs a source to subscribe to."""

    location = "nowhere"

    def subscribe(self, wake) -> None:
        pass


def unknown_label(folder: Path) -> None:
    (folder / "purple").mkdir()
    (folder / "purple" / "0.png").write_bytes((folder / "red" / "0.png").read_bytes())


def not_an_image(folder: Path) -> None:
    (folder / "red" / "0.png").write_bytes(b"not a png")


def truncated(folder: Path) -> None:
    path = folder / "red" / "1.png"
    path.write_bytes(path.read_bytes()[:60])


@pytest.mark.parametrize(
    ("break_set", "message"),
    [
        (unknown_label, "evaluation.images has folders that are not labels: purple"),
        (not_an_image, "evaluation image '.*/red/0.png' cannot be read: cannot identify image file"),
        (truncated, "evaluation image '.*/red/1.png' cannot be read: .*truncated"),
    ],
)
def test_a_broken_evaluation_set_is_a_config_error_when_the_config_loads(project: Project, break_set, message):
    with_evaluation(project)
    break_set(project.root / "eval")
    with pytest.raises(ConfigError, match=message):
        load_config(project.config)


def test_files_and_digest_are_read_from_the_folder_not_given(project: Project):
    write_set(project.root / "eval")
    project.write_config(colours_yaml(extra_model="    evaluation:\n      images: eval\n      digest: abc\n"))
    with pytest.raises(ConfigError, match="files and digest are read from the images folder"):
        load_config(project.config)


def test_validate_with_a_baseline_prints_the_table_and_exits_1_on_a_regression(project: Project):
    with_evaluation(project)
    good, worse = project.stage("good.pt", biased(0.0)), project.stage("worse.pt", biased(6.0))

    def validate(candidate: Path, baseline: Path) -> subprocess.CompletedProcess[str]:
        args = ("validate", "--config", str(project.config), "--baseline", str(baseline), str(candidate))
        return subprocess.run(reloader_cmd(*args), env=subprocess_env(), capture_output=True, text=True, timeout=120)

    regression = validate(worse, good)
    improvement = validate(good, worse)

    assert regression.returncode == 1, regression.stderr
    assert "[FAIL] evaluation accuracy 0.417 < live 1.000 - 0.05" in regression.stdout
    assert "    green                0.000     1.000   -1.000" in regression.stdout
    assert "    accuracy             0.417     1.000   -0.583" in regression.stdout
    assert improvement.returncode == 0, improvement.stdout + improvement.stderr
    assert "    accuracy             1.000     0.417   +0.583" in improvement.stdout


def test_demo_config_scores_its_committed_evaluation_set():
    config = load_config(Path(__file__).resolve().parent.parent / "config" / "models.yaml")
    evaluation = config.models["shapes"].evaluation
    assert evaluation is not None
    labels = [label for _, label in evaluation.files]
    assert {label: labels.count(label) for label in set(labels)} == dict.fromkeys(config.models["shapes"].labels, 50)
