"""Progress lines a curator can read: done / total, rates, failures, and an ETA once it means something."""

from pipeline.progress import ProgressReport, duration


def test_progress_line_has_percent_rates_failures_and_eta():
    report = ProgressReport(total_shards=1000, interval_s=30, started=0.0)
    assert not report.due(29.0) and report.due(30.0)
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
