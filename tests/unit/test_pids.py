"""`process_exists`: what the resume sweep and the embedded database ask of a pid."""

from __future__ import annotations

import os
import subprocess
import sys

from dynamo.supervision.pids import process_exists


def test_a_running_process_exists():
    assert process_exists(os.getpid())


def test_a_process_that_ended_does_not():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names no process now
    assert not process_exists(child.pid)


def test_another_users_process_exists():
    # pid 1 is init, root's: signalling it is refused (PermissionError) unless we are
    # root or init ourselves, and either way it exists.
    assert process_exists(1)
