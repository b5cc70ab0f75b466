"""Progress lines a curator can read: done / total, rates, failures, and an ETA once it means something."""

import threading
import time

from pipeline.progress import ProgressReport, ProgressTicker, duration


def test_progress_line_has_percent_rates_failures_and_eta():
    report = ProgressReport(total_shards=1000, interval_s=30, started=0.0)
    first = report.line(committed=2, failed=0, samples=500, now=30.0)
    assert first.startswith("progress: 2/1000 shards committed (0.2% done), 0 failed, 500 samples")
    assert "ETA" not in first  # two shards: mostly start-up, no estimate yet
    line = report.line(committed=98, failed=2, samples=25_000, now=630.0)
    # 100 of 1000 shards done in 630 s: 900 more take 5670 s
    assert line.startswith("progress: 98/1000 shards committed") and "(10.0% done), 2 failed, 25,000 samples" in line
    assert "40.8 pairs/s now" in line  # (25000 - 500) / 600 s
    assert "39.7 overall" in line and line.endswith("ETA 1h34m")
    assert "ETA" not in report.line(committed=998, failed=2, samples=250_000, now=7000.0)  # finished


def test_durations_read_as_hours_and_minutes():
    assert duration(59) == "0m59s" and duration(3600 * 27 + 60 * 5) == "27h05m"


def test_a_line_every_interval_while_no_batch_arrives():
    """On CPU one batch can take longer than the interval: the lines keep coming, with the counts as the
    driver last updated them, and stop when the run ends."""
    counts, lines, three = [0, 0, 0, 0], [], threading.Event()

    def emit(line):
        lines.append(line)
        if len(lines) == 3:
            three.set()

    with ProgressTicker(ProgressReport(total_shards=10, interval_s=0.05), lambda: tuple(counts), emit):
        assert three.wait(timeout=10)
        counts[:] = [4, 1, 300, 2]
        deadline = time.time() + 10
        while not lines[-1].startswith("progress: 4/10 shards committed (50.0% done), 1 failed, 300 samples"):
            assert time.time() < deadline, lines
            time.sleep(0.01)
    stopped = len(lines)
    time.sleep(0.2)
    assert len(lines) == stopped  # the thread stopped with the run
    # before the first batch: no rate of 0.0 that reads as a stall, but what is happening
    assert lines[0].startswith("starting: ") and "0/10 shards committed" in lines[0] and "pairs/s" not in lines[0]


def test_the_line_counts_encoders_until_all_have_embedded():
    report = ProgressReport(total_shards=10, interval_s=30, started=0.0, encoders=2)
    assert report.line(0, 0, 0, 0, now=20.0).startswith(
        "starting: 0m20s in, 0/2 encoders have embedded a batch")
    assert report.line(1, 0, 64, 1, now=40.0).endswith("; 1/2 encoders have embedded a batch")
    assert "encoders" not in report.line(2, 0, 128, 2, now=60.0)
