"""Counting what the loader had to skip or read again, so training goes on and the trainer can
log it."""

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


@dataclass(frozen=True)
class RetryEvent:
    """A stream that broke off (a dropped connection, a failed command) and is read again."""

    shard: str  # the location: URL or pipe: command
    retry: int  # 1 for the first retry
    retries: int  # how many are allowed
    reason: str
    wait: float  # seconds before this retry

    def __str__(self) -> str:
        return (
            f"retrying {self.shard} in {self.wait:g} s (retry {self.retry} of {self.retries}): "
            f"{self.reason}"
        )


class DataStats:
    """Counts of valid and skipped samples seen by one loader (all ranks' workers merged per rank).

    ``skipped`` is the number of skip events; ``counts`` splits it by kind; ``events`` keeps the
    most recent ``max_events`` with their shard and key. ``retries`` counts the streams read
    again after they broke off (``RetryEvent``; no sample is lost or read twice by one).
    """

    # a shard full of damage should not bury the training log: past this many warnings per
    # DataStats (per worker and epoch in the stream) skips are only counted
    log_limit = 100

    def __init__(self, max_events: int = 1000) -> None:
        self.samples = 0
        self.retries = 0
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

    def record_retry(self, event: RetryEvent, *, log: bool = True) -> None:
        self.retries += 1
        if log:
            logger.warning("%s", event)

    def merge_events(self, events: list[SkipEvent | RetryEvent]) -> None:
        """Take events another process already logged (a DataLoader worker's)."""
        for event in events:
            if isinstance(event, RetryEvent):
                self.record_retry(event, log=False)
            else:
                self.record(event, log=False)

    def as_dict(self) -> dict[str, int]:
        """Flat numbers for a training log: ``samples``, ``skipped``, ``skipped/<kind>``,
        ``retries``."""
        out = {"samples": self.samples, "skipped": self.skipped, "retries": self.retries}
        out.update({f"skipped/{kind}": self.counts[kind] for kind in SKIP_KINDS})
        return out

    def summary(self) -> str:
        retried = f", {self.retries} streams retried" if self.retries else ""
        if not self.skipped:
            return f"{self.samples} valid samples, none skipped{retried}"
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts.items()))
        last = self.events[-1] if self.events else None
        tail = f"; last: {last}" if last else ""
        return f"{self.samples} valid samples, {self.skipped} skipped ({kinds}){retried}{tail}"

    def __repr__(self) -> str:
        return f"DataStats({self.summary()})"
