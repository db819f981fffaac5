"""The suite's guard against native crashes: a worker killed by a signal fails one call only."""

from __future__ import annotations

import os
import signal

import pytest

from isolate import isolated


def test_a_crash_in_the_worker_fails_that_call_and_the_next_one_runs():
    with pytest.raises(AssertionError, match="crashed its process .*SIGSEGV"):
        isolated(os.kill, isolated(os.getpid), signal.SIGSEGV)
    assert isolated(os.getpid) != os.getpid()
