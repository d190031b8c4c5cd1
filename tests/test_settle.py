"""When a file counts as finished, driven by a fake clock: no sleeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from reloader.config import WatchConfig
from reloader.settle import CREATED_GRACE_S, QUIET_WITHOUT_CLOSE_S, FileEvent, Settling

FILE = Path("/ck/model-v2.pt")


def test_a_rename_into_the_folder_is_finished_at_once():
    settling = Settling(WatchConfig())

    assert settling.event(FILE, FileEvent.MOVED, now=10.0) is True
    assert settling.due_now(10.0)
    assert settling.unsettled(10.0) == set()


def test_an_in_place_write_waits_for_its_close_however_long_the_pauses():
    settling = Settling(WatchConfig(settle_ms=200))

    assert settling.event(FILE, FileEvent.CREATED, now=0.0) is False
    assert settling.event(FILE, FileEvent.WRITTEN, now=0.001) is False
    # A writer pausing longer than settle_ms is still writing: it has not closed the file.
    assert FILE in settling.unsettled(1.5)
    assert settling.event(FILE, FileEvent.WRITTEN, now=1.6) is False
    assert FILE in settling.unsettled(3.0)

    assert settling.event(FILE, FileEvent.CLOSED, now=3.1) is True
    assert settling.unsettled(3.1) == set()


def test_a_file_written_and_never_closed_is_tried_after_the_quiet_period_but_a_failure_waits_for_its_close():
    settling = Settling(WatchConfig(settle_ms=200))
    settling.event(FILE, FileEvent.WRITTEN, now=0.0)

    # Past the quiet period the listing lets it be judged (mmap writers never close) ...
    assert settling.unsettled(QUIET_WITHOUT_CLOSE_S + 1) == set()
    # ... but if it fails, it is still arriving (a writer paused with it open), and no timer re-reads it.
    assert FILE in settling.unsettled(QUIET_WITHOUT_CLOSE_S + 1, forget=False)
    settling.retry(FILE, now=QUIET_WITHOUT_CLOSE_S + 1)
    assert settling.next_due() is None

    assert settling.event(FILE, FileEvent.CLOSED, now=10.0) is True
    assert settling.unsettled(10.0, forget=False) == set()
    assert settling.due_now(10.0)


def test_a_created_file_with_no_writes_is_a_rename_and_settles_after_a_short_grace():
    settling = Settling(WatchConfig())

    settling.event(FILE, FileEvent.CREATED, now=5.0)

    assert FILE in settling.unsettled(5.0)
    assert settling.next_due() == pytest.approx(5.0 + CREATED_GRACE_S)
    assert settling.unsettled(5.0 + CREATED_GRACE_S) == set()


def test_a_file_written_but_never_closed_settles_once_quiet():
    settling = Settling(WatchConfig(settle_ms=100))

    settling.event(FILE, FileEvent.WRITTEN, now=0.0)

    assert FILE in settling.unsettled(QUIET_WITHOUT_CLOSE_S - 0.01)
    assert settling.unsettled(QUIET_WITHOUT_CLOSE_S) == set()


def test_when_polling_a_file_settles_after_settle_ms_without_changes():
    settling = Settling(WatchConfig(poll=True, settle_ms=300))

    settling.event(FILE, FileEvent.CREATED, now=0.0)
    settling.event(FILE, FileEvent.WRITTEN, now=0.2)

    assert FILE in settling.unsettled(0.45)
    assert not settling.due_now(0.45)
    assert settling.due_now(0.5)
    assert settling.unsettled(0.5) == set()


def test_a_deleted_file_is_forgotten_and_a_failed_one_is_retried_later():
    settling = Settling(WatchConfig(settle_ms=0))
    settling.event(FILE, FileEvent.WRITTEN, now=0.0)

    assert settling.event(FILE, FileEvent.DELETED, now=0.1) is True
    assert not settling.waiting()

    settling.retry(FILE, now=1.0)
    assert FILE in settling.unsettled(1.01)
    assert settling.unsettled(1.06) == set()


def test_an_unknown_event_kind_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown file event kind 'renamed'"):
        Settling(WatchConfig()).event(FILE, "renamed", now=0.0)
