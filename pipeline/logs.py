"""What a job prints: its summary line on stdout in one piece; one known false alarm of Ray's C++ core worker
dropped from the driver's stderr.

Ray Data 2.60 hands every actor of an actor pool its map function and DataContext as object-store
references, with actor restarts on (max_restarts=-1, what lets the pool survive a lost node), and Ray's
core worker then logs at error level that such an actor "has constructor arguments in the object store and
max_restarts > 0" (ray-project/ray#57733, open: it happens for any Ray Data actor pool; the references live
as long as the dataset runs, so restarts work). Turning restarts off would silence it and lose node-loss
recovery, so the job filters that one line instead: C++ writes it straight to file descriptor 2, hence a
pipe in front of the descriptor, not a Python logging filter. Every other line passes through unchanged.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading

FALSE_ALARMS = (b"has constructor arguments in the object store and max_restarts > 0",)


def drop_false_alarms(patterns: tuple[bytes, ...] = FALSE_ALARMS) -> None:
    """Route this process's stderr through a thread that drops lines holding any of `patterns`. For a job's
    entry point (it owns the process's stderr); tests call the jobs' main() without it."""
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    terminal = os.dup(2)
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def pump() -> None:
        pending = b""
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                *lines, pending = (pending + chunk).split(b"\n")
                kept = b"".join(line + b"\n" for line in lines if not any(p in line for p in patterns))
                if kept:
                    os.write(terminal, kept)
        if pending:
            os.write(terminal, pending)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:
        # at exit (after any traceback has been printed): give fd 2 back, let the thread pass on the rest
        sys.stderr.flush()
        os.dup2(terminal, 2)
        thread.join(timeout=2)

    atexit.register(restore)


def print_summary(report: dict) -> None:
    """`summary: {json}` on stdout as one write: print() writes the line and its end apart, and where stdout
    and stderr share a file (`ray job submit`'s log, `2>&1`) a log line written between the two ended up on
    the summary's line (seen in the chaos test's log)."""
    sys.stdout.write("summary: " + json.dumps(report, ensure_ascii=False) + "\n")
    sys.stdout.flush()
