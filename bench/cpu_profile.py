"""Runs a script under cProfile timed by the main thread's CPU time, not the wall clock:
on a loaded machine a send() that wakes PostgreSQL is often preempted for milliseconds,
which a wall-clock profile charges to the send. Used by `bench.capacity --profile cpu`.

    python bench/cpu_profile.py OUT.prof run.py
"""

import cProfile
import os
import runpy
import sys
import time

if __name__ == "__main__":
    out, script = sys.argv[1], sys.argv[2]
    sys.argv = [script]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        profiler.disable()
        profiler.dump_stats(out)
