"""Checkpoint formats read with bounded memory (issue 13): safetensors without a second copy, zip bombs unread."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as library_load
from safetensors.torch import save, save_file
from tinynet import colour_state_dict

from reloader.checkpoints import load_checkpoint
from reloader.errors import CheckpointRejected
from reloader.formats import _DTYPES

MIB = 1 << 20


def every_dtype() -> dict[str, torch.Tensor]:
    out = {}
    for i, dtype in enumerate(_DTYPES.values()):
        base = torch.arange(-3, 9, dtype=torch.float32).reshape(3, 4)
        out[f"t{i}.{dtype}"] = base.abs().to(dtype) if not dtype.is_signed else base.to(dtype)
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 7)
    return out


def test_every_dtype_reads_as_the_safetensors_library_reads_it(tmp_path: Path):
    path = tmp_path / "all.safetensors"
    tensors = every_dtype()
    save_file(tensors, str(path), metadata={"format": "pt"})

    ours = load_checkpoint(path).state_dict
    theirs = library_load(path.read_bytes())

    assert set(ours) == set(theirs) == set(tensors)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape
        assert torch.equal(ours[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_empty_tensors_of_other_dtypes_at_one_offset_read_as_the_library_reads_them(tmp_path: Path):
    path = tmp_path / "empty.safetensors"
    save_file({"a": torch.zeros(0, 3), "b": torch.zeros(0, dtype=torch.int64), "c": torch.ones(2)}, str(path))

    ours = load_checkpoint(path).state_dict
    theirs = library_load(path.read_bytes())

    assert {k: (v.dtype, v.shape) for k, v in ours.items()} == {k: (v.dtype, v.shape) for k, v in theirs.items()}
    assert torch.equal(ours["c"], theirs["c"])


def _file(header: object, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


GOOD = save({"a": torch.ones(2, 2), "b": torch.zeros(3)})
F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (GOOD[:5], "shorter than its 8-byte header length"),
        (struct.pack("<Q", 1 << 40) + b"{}", "header of 1099511627776 bytes does not fit"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "header is not JSON"),
        (_file([1, 2]), "not a JSON object"),
        (_file({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), "is not {dtype, shape, data_offsets}"),
        (_file({"a": {**F32, "dtype": "Q9"}}, bytes(8)), "unknown dtype 'Q9'"),
        (_file({"a": {**F32, "shape": [-2]}}, bytes(8)), "shape that is not a list of sizes"),
        (_file({"a": {**F32, "data_offsets": [0]}}, bytes(8)), "data_offsets that are not two positions"),
        (_file({"a": {**F32, "shape": [1 << 40]}}, bytes(8)), "spans 8 bytes, but [1099511627776] of F32"),
        (_file({"a": F32, "b": F32}, bytes(8)), "starts at 0, not at 8: offsets overlap"),
        (_file({"a": F32, "b": {**F32, "dtype": "I32"}}, bytes(8)), "starts at 0, not at 8: offsets overlap"),
        (_file({"a": {**F32, "data_offsets": [8, 16]}}, bytes(16)), "starts at 8, not at 0"),
        (_file({"a": F32}, bytes(12)), "tensors cover 8 bytes of the 12"),
        (GOOD[:-4], "tensors cover 28 bytes of the 24"),
    ],
)
def test_a_malformed_safetensors_file_is_rejected_with_the_reason(tmp_path: Path, content: bytes, message: str):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)

    with pytest.raises(CheckpointRejected, match="not a valid safetensors file") as caught:
        load_checkpoint(path)
    assert message in caught.value.reason


PEAK = """
import resource, sys
from pathlib import Path
from reloader.checkpoints import load_checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loaded = load_checkpoint(Path(sys.argv[1]))
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, sum(t.nbytes for t in loaded.state_dict.values()))
"""


def test_a_safetensors_file_costs_one_copy_of_its_tensors_not_two(tmp_path: Path):
    path = tmp_path / "big.safetensors"
    save_file({f"w{i}": torch.rand(8 * MIB // 4) for i in range(24)}, str(path))  # 192 MiB
    size = path.stat().st_size

    out = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, check=True)
    before_kib, peak_kib, loaded = map(int, out.stdout.split())

    assert loaded == size - 8 - struct.unpack("<Q", path.read_bytes()[:8])[0]
    # The file's bytes plus the tensors would be 2x; what is allowed is the tensors plus a margin.
    assert (peak_kib - before_kib) * 1024 < 1.25 * size, f"peak grew {(peak_kib - before_kib) // 1024} MiB"


def _deflated_bomb(path: Path, inflated: int) -> None:
    buf = io.BytesIO()
    torch.save(colour_state_dict(), buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for member in src.infolist():
            dst.writestr(member, src.read(member))
        with dst.open(zipfile.ZipInfo("archive/data/99"), "w", force_zip64=True) as out:
            zeros = bytes(16 * MIB)
            for _ in range(inflated // len(zeros)):
                out.write(zeros)
    # ZipFile.open for writing deflates only when asked: rewrite the member deflated.
    with zipfile.ZipFile(path) as src:
        members = [(m, src.read(m)) for m in src.infolist()]
    with zipfile.ZipFile(path, "w") as dst:
        for member, data in members:
            member.compress_type = zipfile.ZIP_DEFLATED if member.filename.endswith("/99") else zipfile.ZIP_STORED
            dst.writestr(member, data)


def test_a_pt_file_whose_members_would_inflate_far_past_it_is_refused_before_inflating(tmp_path: Path):
    path = tmp_path / "bomb.pt"
    _deflated_bomb(path, 256 * MIB)
    assert path.stat().st_size < 2 * MIB

    with pytest.raises(CheckpointRejected, match="members would inflate to") as caught:
        load_checkpoint(path)
    assert "'archive/data/99', declares 268435456 bytes (compressed" in caught.value.reason


def test_a_plain_torch_save_file_is_within_the_inflation_bound(tmp_path: Path):
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.rand(1000, 100), **colour_state_dict()}, path)

    assert torch.equal(load_checkpoint(path).state_dict["fc.weight"], colour_state_dict()["fc.weight"])
