"""Whether a process is alive, by its pid: the resume sweep asks it of a worker on this
host (gone: its requests are taken over at once), and the embedded database of the
processes pgserver thinks use the server (gone: forgotten, else the server never stops).
"""

from __future__ import annotations

import os


def process_exists(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0 only checks, sends nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
