"""How far and how fast the job runs: progress lines with an ETA, and the encoder pool's steady-state rate."""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable

MIN_SHARDS_FOR_ETA = 3  # an ETA from one or two commits is mostly start-up


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class ProgressReport:
    """A progress line every `interval_s`: shards committed of the total and percent done, samples, pairs/s
    over the last interval and overall, failed shards, and an ETA from the shard rate once a few shards
    are committed."""

    def __init__(self, total_shards: int, interval_s: float, started: float | None = None, encoders: int = 0):
        self.total, self.interval_s, self.encoders = total_shards, interval_s, encoders
        self.started = self.last_time = started if started is not None else time.time()
        self.last_samples = 0

    def line(self, committed: int, failed: int, samples: int, encoders_seen: int = 0, *, now: float) -> str:
        """`encoders_seen`: encoder actors that have embedded a batch so far."""
        elapsed, interval = max(now - self.started, 1e-9), max(now - self.last_time, 1e-9)
        if samples == 0 and committed + failed == 0:  # a rate of 0.0 would read as a stall
            return (f"starting: {duration(elapsed)} in, 0/{self.encoders or '?'} encoders have embedded a batch "
                    f"(Ray starting actors, encoders loading weights), 0/{self.total} shards committed")
        recent = (samples - self.last_samples) / interval
        self.last_time, self.last_samples = now, samples
        done = committed + failed
        text = (f"progress: {committed}/{self.total} shards committed ({100 * done / max(self.total, 1):.1f}% done), "
                f"{failed} failed, {samples:,} samples, {recent:,.1f} pairs/s now, {samples / elapsed:,.1f} overall")
        if committed >= MIN_SHARDS_FOR_ETA and done < self.total:
            text += f", ETA {duration((self.total - done) * elapsed / done)}"
        if 0 < encoders_seen < self.encoders:
            text += f"; {encoders_seen}/{self.encoders} encoders have embedded a batch"
        return text


class ProgressTicker:
    """Emits `report.line(*counts())` every interval from a daemon thread, whether or not a batch arrived:
    on CPU one batch can take longer than the interval, and a curator should still see a line per interval.
    `counts` returns (committed, failed, samples, encoders seen) as the driver loop last updated them."""

    def __init__(self, report: ProgressReport, counts: Callable[[], tuple[int, int, int, int]],
                 emit: Callable[[str], None]):
        self.report, self.counts, self.emit = report, counts, emit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.report.interval_s):
            self.emit(self.report.line(*self.counts(), now=time.time()))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class SteadyClock:
    """The steady-state rate: samples per second while every encoder actor is warm.

    The window opens when the last actor to start has finished its first batch (Ray Data start, actor start,
    weight load and first batch are before it: start-up; see window_start for an actor with one batch) and
    closes at the last part written. A batch that straddles the opening counts for the share of its run time
    inside the window, so work done before the window never flatters the rate.
    """

    def __init__(self):
        self.batches: dict[tuple[str, float], list] = {}  # (actor, started) -> [finished, samples]

    def encoders(self) -> int:
        """Encoder actors that have embedded a batch so far."""
        return len({encoder for encoder, _ in self.batches})

    def add(self, encoder: str, started: float, finished: float, samples: int) -> None:
        batch = self.batches.setdefault((encoder, started), [finished, 0])
        batch[0], batch[1] = max(batch[0], finished), batch[1] + samples

    def pairs_by_encoder(self) -> dict[str, int]:
        pairs = collections.Counter()
        for (encoder, _), (_, samples) in self.batches.items():
            pairs[encoder] += samples
        return dict(pairs)

    def window_start(self) -> float | None:
        """When the last actor has finished its first batch, counting only actors that ran more than one:
        an actor fed a single batch at the very end would otherwise leave no window at all (its batch
        still counts, for the share of it inside the window)."""
        finishes: dict[str, list[float]] = collections.defaultdict(list)
        for (encoder, _), (finished, _) in self.batches.items():
            finishes[encoder].append(finished)
        return max((min(times) for times in finishes.values() if len(times) > 1), default=None)

    def steady_rate(self, end: float) -> float | None:
        opens = self.window_start()
        if opens is None or end <= opens:
            return None
        inside = 0.0
        for (_, started), (finished, samples) in self.batches.items():
            if finished > opens:
                inside += samples * (finished - max(started, opens)) / max(finished - started, 1e-9)
        return inside / (end - opens) if inside else None
