"""The suite's guard against native crashes: a worker killed by a signal fails one call only."""

from __future__ import annotations

import os
import signal

import pytest

from isolate import isolated


def test_a_crash_in_the_worker_fails_that_call_and_the_next_one_runs():
    # the signal is named when the dead worker is reaped in time (best effort on a busy machine)
    with pytest.raises(AssertionError, match="crashed its process"):
        isolated(os.kill, isolated(os.getpid), signal.SIGSEGV)
    assert isolated(os.getpid) != os.getpid()
