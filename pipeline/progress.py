"""How fast the job runs: the steady-state rate of the encoder pool, from the batches' own start and finish times."""

from __future__ import annotations

import collections


class SteadyClock:
    """The steady-state rate: samples per second while every encoder actor is warm.

    The window opens when the last actor to start has finished its first batch (Ray Data start, actor start,
    weight load and first batch are before it: start-up; see window_start for an actor with one batch) and
    closes at the last part written. A batch that straddles the opening counts for the share of its run time
    inside the window, so work done before the window never flatters the rate.
    """

    def __init__(self):
        self.batches: dict[tuple[str, float], list] = {}  # (actor, started) -> [finished, samples]

    def add(self, encoder: str, started: float, finished: float, samples: int) -> None:
        batch = self.batches.setdefault((encoder, started), [finished, 0])
        batch[0], batch[1] = max(batch[0], finished), batch[1] + samples

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
