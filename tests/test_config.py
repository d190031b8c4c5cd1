"""The config schema: typed, frozen, and errors that name the file, the key path and the value."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Project, colours_yaml
from pydantic import ValidationError

from reloader.config import IMAGENET_MEAN, load_config
from reloader.errors import ConfigError


def test_a_valid_config_resolves_paths_against_its_folder_and_fills_defaults(project: Project):
    config = load_config(project.config)

    model = config.models["colours"]
    assert model.checkpoints == project.checkpoints
    assert model.warmup.images[0] == project.golden / "red.png"
    assert model.labels == ("red", "green", "blue")
    assert model.preprocess.mean == IMAGENET_MEAN
    assert model.batch.max_size == 8
    assert config.default_model == "colours"
    assert config.watch.poll is False
    assert len(config.digest) == 64


def test_config_objects_are_immutable(project: Project):
    config = load_config(project.config)

    with pytest.raises(ValidationError):
        config.models["colours"].num_classes = 7  # type: ignore[misc]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("num_classes: 3", "num_classes: -3"), "models.colours.num_classes: must be > 0, got -3"),
        (("arch: tinynet:colour_net", "arch: resnet9000"), "models.colours.arch: 'resnet9000' is not a torchvision"),
        (("labels: [red, green, blue]", "labels: [red, green]"), "models.colours: 2 labels given for num_classes=3"),
        (("version: latest", "version: newest"), "models.colours.version"),
        (("golden/blue.png", "golden/purple.png"), "warm-up image"),
        (("expect: [red, green, blue]", "expect: [red, green, mauve]"), "warmup.expect names 'mauve'"),
        (("port: 0", "port: 99999"), "server.port: must be <= 65535, got 99999"),
        (("default_model: colours", "default_model: nope"), "server.default_model 'nope' is not one of the models"),
        (("preprocess: {resize: 32, crop: 32}", "preprocess: {resize: 32, crop: 64}"), "crop (64) must not exceed"),
        (
            ("    num_classes: 3\n", "    num_classes: 3\n    colour: blue\n"),
            "models.colours.colour: is not a known key",
        ),
    ],
)
def test_an_invalid_config_names_the_file_the_key_path_and_the_value(project: Project, edit, message):
    project.config.write_text(colours_yaml().replace(*edit))

    with pytest.raises(ConfigError) as info:
        load_config(project.config)

    assert str(info.value).startswith(f"{project.config}: ")
    assert message in str(info.value)


def test_invalid_yaml_and_a_missing_file_are_config_errors(project: Project, tmp_path: Path):
    project.config.write_text("models: [unclosed\n")

    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(project.config)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")


def test_labels_come_from_a_text_file_or_from_torchvision_for_imagenet(project: Project):
    (project.root / "labels.txt").write_text("red\ngreen\n\nblue\n")
    project.config.write_text(colours_yaml().replace("labels: [red, green, blue]", "labels: labels.txt"))
    assert load_config(project.config).models["colours"].labels == ("red", "green", "blue")

    imagenet = colours_yaml().replace("labels: [red, green, blue]", "labels: imagenet")
    imagenet = imagenet.replace("num_classes: 3", "num_classes: 1000").replace("      expect: [red, green, blue]\n", "")
    project.config.write_text(imagenet)
    labels = load_config(project.config).models["colours"].labels
    assert len(labels) == 1000
    assert labels[0] == "tench"
