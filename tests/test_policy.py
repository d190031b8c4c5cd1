"""The version policy as tables of snapshots: a listing, the live version, the pin and what is known in,
one decision out. No threads, no files (TF Serving's availability_preserving_policy_test.cc)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reloader.checkpoints import Candidate
from reloader.policy import (
    FileStatus,
    Hash,
    Judge,
    Known,
    LiveFile,
    Serving,
    Settled,
    plan,
)
from reloader.source import Listing

LIVE, STANDBY, INCOMPLETE, REJECTED = FileStatus.LIVE, FileStatus.STANDBY, FileStatus.INCOMPLETE, FileStatus.REJECTED


def file(version: int, mtime: int = 0, *, inode: int | None = None) -> Candidate:
    """A listed checkpoint: v1.pt, v2.pt, ...; `inode` changes its signature (its content may have changed)."""
    return Candidate(version, mtime, Path(f"/ckpt/v{version}.pt"), 100, version if inode is None else inode)


V1, V2, V3 = file(1), file(2), file(3)
V2_LATER = Candidate(2, 5, Path("/ckpt/v2-again.pt"), 100, 22)


def serving(cand: Candidate, sha: str = "sha-live", *, current: bool = True) -> Serving:
    return Serving(cand.path, cand.version, cand.mtime_ns, sha, current)


def listing(*cands: Candidate, arriving: tuple[Candidate, ...] = (), error: str | None = None) -> Listing:
    ordered = tuple(sorted(cands, reverse=True))
    return Listing(ordered, frozenset(c.path for c in arriving), error)


def known(
    hashes: dict[Candidate, str] | None = None,
    rejected: dict[str, str] | None = None,
    judged: dict[Candidate, tuple[FileStatus, str | None]] | None = None,
    stale: tuple[Candidate, ...] = (),
) -> Known:
    """`hashes`: each file's sha256 as hashed under its current signature; `stale`: hashed under an older one."""
    table = {c.path: (c.signature, sha) for c, sha in (hashes or {}).items()}
    table |= {c.path: ((0, 0, 0), "sha-before") for c in stale}
    return Known(table, rejected or {}, {c.path: v for c, v in (judged or {}).items()})


def settled(live_file: LiveFile, error: str | None, *files: tuple[Candidate, FileStatus, str | None]) -> Settled:
    return Settled(tuple(files), live_file, error)


NOTHING_LIVE = LiveFile.NONE
# Each row: what the source lists, what serves, the pin, what is known -> the one decision.
TABLE = [
    # --- nothing serves yet
    ("an empty folder", listing(), None, "latest", known(), settled(NOTHING_LIVE, "no checkpoint files")),
    ("a first file is judged", listing(V1), None, "latest", known(), Judge(V1, None)),
    ("the newest file first", listing(V1, V3, V2), None, "latest", known(), Judge(V3, None)),
    (
        "a version tie goes to the newer mtime",
        listing(V2, V2_LATER),
        None,
        "latest",
        known(),
        Judge(V2_LATER, None),
    ),
    (
        "a file still arriving is skipped, the next one judged",
        listing(V1, V2, arriving=(V2,)),
        None,
        "latest",
        known(),
        Judge(V1, None),
    ),
    (
        "a rejected content is not judged again",
        listing(V1, V2),
        None,
        "latest",
        known({V2: "sha-bad"}, {"sha-bad": "warmup: wrong"}),
        Judge(V1, None),
    ),
    (
        "every file rejected: nothing serves",
        listing(V1),
        None,
        "latest",
        known({V1: "sha-bad"}, {"sha-bad": "finite: NaN"}),
        settled(NOTHING_LIVE, "no valid checkpoint", (V1, REJECTED, "finite: NaN")),
    ),
    (
        "a file judged incomplete in this pass keeps that status",
        listing(V1),
        None,
        "latest",
        known(judged={V1: (INCOMPLETE, "still being written")}),
        settled(NOTHING_LIVE, "no valid checkpoint", (V1, INCOMPLETE, "still being written")),
    ),
    ("a folder that cannot be read", listing(error="gone"), None, "latest", known(), settled(NOTHING_LIVE, "gone")),
    # --- a version serves: it bounds the search
    (
        "older files are standby",
        listing(V1, V2),
        serving(V2),
        "latest",
        known({V2: "sha-live"}),
        settled(LiveFile.PRESENT, None, (V2, LIVE, None), (V1, STANDBY, None)),
    ),
    ("a newer file is judged", listing(V1, V2, V3), serving(V2), "latest", known({V2: "sha-live"}), Judge(V3, None)),
    (
        "the live file is hashed first when it may have changed",
        listing(V2),
        serving(V2),
        "latest",
        known(stale=(V2,)),
        Hash(V2),
    ),
    (
        "a file hashed before is hashed again when its signature changed",
        listing(V2, V3),
        serving(V2),
        "latest",
        known({V2: "sha-live"}, stale=(V3,)),
        Hash(V3),
    ),
    (
        "the live file overwritten with other content is judged",
        listing(V2),
        serving(V2),
        "latest",
        known({V2: "sha-new"}),
        Judge(V2, "sha-new"),
    ),
    (
        "overwritten with rejected content: the version in memory serves on",
        listing(V1, V2),
        serving(V2),
        "latest",
        known({V2: "sha-new"}, {"sha-new": "load: garbage"}),
        settled(LiveFile.REPLACED, None, (V2, REJECTED, "load: garbage"), (V1, STANDBY, None)),
    ),
    (
        "the live file deleted: fall back to the newest remaining one",
        listing(V1),
        serving(V2),
        "latest",
        known(),
        Judge(V1, None),
    ),
    (
        "the live file deleted and nothing else valid: memory serves on",
        listing(V1),
        serving(V2),
        "latest",
        known({V1: "sha-bad"}, {"sha-bad": "structure: missing keys"}),
        settled(LiveFile.DELETED, None, (V1, REJECTED, "structure: missing keys")),
    ),
    (
        "a file that could not be hashed this pass stays standby, and the next one is judged",
        listing(V1, V3),
        serving(V1),
        "latest",
        known({V1: "sha-live"}, judged={V3: (STANDBY, None)}),
        settled(LiveFile.PRESENT, None, (V3, STANDBY, None), (V1, LIVE, None)),
    ),
    (
        "an unreadable folder while a version serves: the error, and it serves on",
        listing(error="checkpoints folder /ckpt is missing"),
        serving(V2),
        "latest",
        known(),
        settled(LiveFile.DELETED, "checkpoints folder /ckpt is missing"),
    ),
    # --- pins
    (
        "a pin below the live version rolls back",
        listing(V1, V2),
        serving(V2),
        1,
        known({V2: "sha-live"}),
        Judge(V1, None),
    ),
    (
        "a pin on the live version: newer files are not looked at",
        listing(V1, V2, V3),
        serving(V2),
        2,
        known({V2: "sha-live"}),
        settled(LiveFile.PRESENT, None, (V3, STANDBY, None), (V2, LIVE, None), (V1, STANDBY, None)),
    ),
    (
        "a pin on a missing version: the live one keeps serving, and the error says so",
        listing(V1, V2),
        serving(V2),
        3,
        known({V2: "sha-live"}),
        settled(
            LiveFile.PRESENT,
            "pinned version 3 has no valid checkpoint; version 2 keeps serving",
            (V2, LIVE, None),
            (V1, STANDBY, None),
        ),
    ),
    (
        "a pin on a missing version with nothing live",
        listing(V1),
        None,
        3,
        known(),
        settled(NOTHING_LIVE, "pinned version 3 has no valid checkpoint; nothing serves", (V1, STANDBY, None)),
    ),
    # --- the model's definition changed: everything is judged again, the live file too
    (
        "a changed definition judges even the live file again",
        listing(V1, V2),
        serving(V2, current=False),
        "latest",
        known({V2: "sha-live"}),
        Judge(V2, "sha-live"),
    ),
    (
        "a changed definition that nothing fits: the old one serves on",
        listing(V2),
        serving(V2, current=False),
        "latest",
        known({V2: "sha-live"}, judged={V2: (REJECTED, "structure: mismatch")}),
        settled(
            LiveFile.PRESENT,
            "the changed definition has no valid checkpoint yet; the previous definition keeps serving",
            (V2, REJECTED, "structure: mismatch"),
        ),
    ),
]


@pytest.mark.parametrize(
    ("listed", "live", "pin", "knowing", "decision"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_the_policy_decides(listed, live, pin, knowing, decision):
    assert plan(listed, live, pin, knowing) == decision


def test_the_policy_is_idempotent_and_reads_nothing_but_its_arguments():
    args = (listing(V1, V2, V3, arriving=(V3,)), serving(V1), "latest", known({V1: "sha-live"}))
    assert plan(*args) == plan(*args) == Judge(V2, None)


def test_a_pass_driven_by_the_policy_ends_after_each_file_is_judged_once():
    """The worker's loop in miniature: judge what the policy asks for, record the verdict, ask again."""
    files = listing(V1, V2, V3)
    judged: dict[Candidate, tuple[FileStatus, str | None]] = {}
    asked = []
    while not isinstance(decision := plan(files, None, "latest", known(judged=judged)), Settled):
        assert isinstance(decision, Judge)
        asked.append(decision.candidate.version)
        judged[decision.candidate] = (REJECTED, f"v{decision.candidate.version} is bad")
    assert asked == [3, 2, 1]
    assert decision.error == "no valid checkpoint"
    assert [status for _, status, _ in decision.files] == [REJECTED] * 3


def test_a_file_over_max_bytes_is_rejected_unread_and_the_next_one_judged():
    big = Candidate(3, 0, Path("/ckpt/v3.pt"), 5000, 3)
    reason = "load: 5000 bytes, over max_checkpoint_bytes (1000)"

    assert plan(listing(V1, big), None, "latest", known(), max_bytes=1000) == Judge(V1, None)
    assert plan(listing(V1, big), serving(V1), "latest", known({V1: "sha-live"}), max_bytes=1000) == settled(
        LiveFile.PRESENT, None, (big, REJECTED, reason), (V1, LIVE, None)
    )
    assert plan(listing(V1, big), None, "latest", known()) == Judge(big, None)  # no limit given: judged


def test_a_canary_bounds_the_search_as_the_live_version_does_and_a_newer_file_replaces_it():
    live, canary = serving(V1), serving(V2, "sha-canary")
    hashes = {V1: "sha-live", V2: "sha-canary"}

    waiting = plan(listing(V1, V2), live, "latest", known(hashes), canary)
    newer = plan(listing(V1, V2, V3), live, "latest", known(hashes), canary)
    changed = plan(listing(V1, V2), live, "latest", known({V1: "sha-live", V2: "sha-other"}), canary)

    assert waiting == settled(LiveFile.PRESENT, None, (V2, FileStatus.CANARY, None), (V1, LIVE, None))
    assert newer == Judge(V3, None)
    assert changed == Judge(V2, "sha-other")  # other bytes at the canary's path are judged anew
