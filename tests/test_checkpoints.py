"""Which files are checkpoints, their versions, and safe loading of every format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tinynet import colour_state_dict

from reloader import checkpoints
from reloader.checkpoints import check_environment, is_checkpoint_name, load_checkpoint, parse_version, scan
from reloader.errors import CheckpointIncomplete, CheckpointRejected, UnsafeEnvironment


@pytest.mark.parametrize(
    ("name", "counts"),
    [
        ("shapes-v12.pt", True),
        ("epoch_003.pth", True),
        ("model.safetensors", True),
        (".shapes-v13.pt", False),
        (".shapes-v13.pt.XyZ12", False),
        ("shapes-v13.pt.tmp", False),
        ("shapes-v13.pt.part", False),
        ("shapes-v13.pt~", False),
        ("optimizer.bin", False),
        ("train.log", False),
    ],
)
def test_only_visible_finished_checkpoint_names_count(name, counts):
    assert is_checkpoint_name(name) is counts


@pytest.mark.parametrize(
    ("name", "version"),
    [("shapes-v12.pt", 12), ("epoch_003.pt", 3), ("resnet18-2024-epoch7.pth", 7), ("final.pt", 0)],
)
def test_the_version_is_the_last_number_in_the_name(name, version):
    assert parse_version(name) == version


def test_scan_orders_newest_first_and_skips_directories_and_links(tmp_path: Path):
    for name in ("a-v2.pt", "a-v10.pt", "a.pt", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir-v99.pt").mkdir()
    (tmp_path / "link-v50.pt").symlink_to(tmp_path / "a-v2.pt")

    assert [c.path.name for c in scan(tmp_path)] == ["a-v10.pt", "a-v2.pt", "a.pt"]


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model_state_dict", "model"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "_orig_mod.module."])
def test_wrapped_and_prefixed_state_dicts_load_to_plain_keys(tmp_path: Path, wrapper, prefix):
    state = {prefix + k: v for k, v in colour_state_dict().items()}
    obj = state if wrapper is None else {wrapper: state, "epoch": 3, "optimizer": {"lr": 0.1}}
    path = tmp_path / "c.pt"
    torch.save(obj, path)

    loaded = load_checkpoint(path)

    assert set(loaded.state_dict) == set(colour_state_dict())
    assert torch.equal(loaded.state_dict["fc.weight"], colour_state_dict()["fc.weight"])
    assert loaded.size == path.stat().st_size


def test_safetensors_files_load(tmp_path: Path):
    path = tmp_path / "c.safetensors"
    save_file(colour_state_dict(), str(path))

    assert set(load_checkpoint(path).state_dict) == set(colour_state_dict())


def test_a_truncated_safetensors_file_is_rejected(tmp_path: Path):
    path = tmp_path / "c.safetensors"
    save_file(colour_state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:-10])

    with pytest.raises(CheckpointRejected, match="not a valid safetensors file"):
        load_checkpoint(path)


def test_a_pickled_model_object_is_not_a_state_dict(tmp_path: Path):
    path = tmp_path / "c.pt"
    torch.save([torch.zeros(2)], path)

    with pytest.raises(CheckpointRejected, match="not a state_dict: the file holds a list"):
        load_checkpoint(path)


def test_a_file_that_changes_while_it_is_read_is_incomplete(tmp_path: Path, monkeypatch):
    path = tmp_path / "c.pt"
    torch.save(colour_state_dict(), path)
    real_hash = checkpoints.hash_open_file

    def hash_then_append(fh, size=None):
        digest = real_hash(fh, size)
        with open(path, "ab") as writer:  # a writer appends right after our read
            writer.write(b"more")
        return digest

    monkeypatch.setattr(checkpoints, "hash_open_file", hash_then_append)
    with pytest.raises(CheckpointIncomplete):
        load_checkpoint(path)


def test_the_sha256_is_of_the_bytes_that_were_loaded(tmp_path: Path):
    import hashlib

    path = tmp_path / "c.pt"
    torch.save(colour_state_dict(), path)

    assert load_checkpoint(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_loading_refuses_to_run_when_weights_only_is_forced_off(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

    with pytest.raises(UnsafeEnvironment, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        check_environment()


def test_a_checkpoint_is_hashed_no_further_than_the_size_it_had_when_opened(tmp_path: Path):
    import hashlib

    from reloader.checkpoints import hash_open_file

    path = tmp_path / "c.pt"
    path.write_bytes(b"0123456789" * 1000)
    with open(path, "rb") as fh:
        assert hash_open_file(fh, 25) == hashlib.sha256(b"0123456789" * 2 + b"01234").hexdigest()
    with open(path, "rb") as fh:
        assert hash_open_file(fh) == hashlib.sha256(path.read_bytes()).hexdigest()
