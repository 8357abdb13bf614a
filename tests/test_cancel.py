"""Stop requests cut waits short, and only waits (tpmid.cancel)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from tpmid import cancel


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    cancel.reset()
    old = signal.signal(signal.SIGUSR1, lambda *_: cancel.request())
    yield
    signal.signal(signal.SIGUSR1, old)
    cancel.reset()


def _signal_in(seconds: float) -> threading.Timer:
    t = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGUSR1))
    t.start()
    return t


def test_a_signal_cuts_an_interruptible_sleep_short() -> None:
    _signal_in(0.2)
    start = time.monotonic()
    with pytest.raises(cancel.Cancelled, match="tpmid is stopping"):
        cancel.sleep(30)
    assert time.monotonic() - start < 5


def test_outside_a_region_a_request_is_only_recorded_and_the_next_region_raises() -> None:
    t = _signal_in(0.05)
    t.join()
    deadline = time.monotonic() + 2
    while not cancel.requested() and time.monotonic() < deadline:
        time.sleep(0.01)  # plain sleep: not a region, nothing is raised here
    assert cancel.requested()
    with pytest.raises(cancel.Cancelled):
        with cancel.interruptible():
            pass  # pragma: no cover - the region raises on entry


def test_regions_on_other_threads_are_not_interrupted_by_the_main_threads_signal() -> None:
    result: list[str] = []

    def worker() -> None:
        with cancel.interruptible():
            time.sleep(0.3)
        result.append("finished")

    th = threading.Thread(target=worker)
    th.start()
    time.sleep(0.05)
    cancel.request()  # called on the main thread, outside any region: recorded only
    th.join()
    assert result == ["finished"]
