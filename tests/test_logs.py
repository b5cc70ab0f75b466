"""The driver's stderr filter drops Ray's one known false alarm and passes everything else, tracebacks too."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import os, sys
sys.path.insert(0, sys.argv[1])
from pipeline.logs import drop_false_alarms
drop_false_alarms()
os.write(2, b"[2026-11-28 07:02:42,435 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(Encoder))'"
            b" and ID: 'ab' has constructor arguments in the object store and max_restarts > 0. If the arguments\n")
os.write(2, b"[2026-11-28 07:02:42,436 E 1 1] core_worker.cc:99: a real error from C++\n")
print("a Python warning line", file=sys.stderr)
print("stdout is untouched")
os.write(2, b"no newline at the end, then a crash: ")
raise RuntimeError("the traceback must survive the filter")
'''


def test_only_the_known_false_alarm_is_dropped():
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "constructor arguments in the object store" not in result.stderr
    assert "core_worker.cc:99: a real error from C++" in result.stderr
    assert "a Python warning line" in result.stderr
    assert "no newline at the end, then a crash: " in result.stderr
    assert "RuntimeError: the traceback must survive the filter" in result.stderr
    assert result.stdout == "stdout is untouched\n"


def test_the_summary_line_is_written_in_one_piece(monkeypatch):
    """Where stdout and stderr share a file (`ray job submit`'s log, `2>&1`), a line written between the summary
    and its line end would end up on the summary's line: the line and its end go in one write."""
    import json as json_module

    from pipeline.logs import print_summary

    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Recorder())
    print_summary({"samples": 3, "errors_by_reason": {"图片": 1}})
    assert len(writes) == 1 and writes[0].startswith("summary: ") and writes[0].endswith("}\n")
    assert json_module.loads(writes[0][len("summary: "):]) == {"samples": 3, "errors_by_reason": {"图片": 1}}
