"""Counting what the loader had to skip, so training goes on and the trainer can log it."""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass

logger = logging.getLogger("ldmkit.data")

# why a sample (or a whole shard, or what was left of one) was skipped
SKIP_KINDS = ("corrupt", "incomplete", "truncated", "unreadable_shard")


@dataclass(frozen=True)
class SkipEvent:
    """One skipped sample or shard: where it was and why."""

    kind: str  # one of SKIP_KINDS
    shard: str
    key: str | None  # None when the whole shard could not be read
    reason: str

    def __str__(self) -> str:
        where = (
            f"shard {self.shard}"
            if self.key is None
            else f"sample {self.key!r} of shard {self.shard}"
        )
        return f"skipped {where} ({self.kind}): {self.reason}"


class DataStats:
    """Counts of valid and skipped samples seen by one loader (all ranks' workers merged per rank).

    ``skipped`` is the number of skip events; ``counts`` splits it by kind; ``events`` keeps the
    most recent ``max_events`` with their shard and key.
    """

    # a shard full of damage should not bury the training log: past this many warnings per
    # DataStats (per worker and epoch in the stream) skips are only counted
    log_limit = 100

    def __init__(self, max_events: int = 1000) -> None:
        self.samples = 0
        self.counts: Counter[str] = Counter()
        self.events: deque[SkipEvent] = deque(maxlen=max_events)
        self._logged = 0

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def record(self, event: SkipEvent, *, log: bool = True) -> None:
        self.counts[event.kind] += 1
        self.events.append(event)
        if log and self._logged < self.log_limit:
            self._logged += 1
            logger.warning("%s", event)
            if self._logged == self.log_limit:
                logger.warning(
                    "%d samples skipped so far; further skips are counted, not logged", self.skipped
                )

    def merge_events(self, events: list[SkipEvent]) -> None:
        """Take events another process already logged (a DataLoader worker's)."""
        for event in events:
            self.record(event, log=False)

    def as_dict(self) -> dict[str, int]:
        """Flat numbers for a training log: ``samples``, ``skipped``, ``skipped/<kind>``."""
        out = {"samples": self.samples, "skipped": self.skipped}
        out.update({f"skipped/{kind}": self.counts[kind] for kind in SKIP_KINDS})
        return out

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.samples} valid samples, none skipped"
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts.items()))
        last = self.events[-1] if self.events else None
        tail = f"; last: {last}" if last else ""
        return f"{self.samples} valid samples, {self.skipped} skipped ({kinds}){tail}"

    def __repr__(self) -> str:
        return f"DataStats({self.summary()})"
