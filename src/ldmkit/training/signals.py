"""Preemption: SIGTERM (what Slurm and Kubernetes send before killing a job) and SIGINT
(Ctrl-C) end training cleanly after the current step; SIGUSR1 writes a checkpoint and goes on.

The handlers only set a flag: a signal never interrupts a step half-way, so the checkpoint
written afterwards holds exactly the state after the last completed step. The trainer then
raises :class:`TrainingInterrupted`, and ``ldmkit train`` exits with :data:`EXIT_PREEMPTED`
(75, ``EX_TEMPFAIL`` of sysexits.h: "temporary failure, run again"), which neither success (0),
an error (1) nor death by the signal itself (130 / 143) can be mistaken for. A second SIGINT
while the step or the checkpoint finishes raises ``KeyboardInterrupt`` at once (the checkpoint
being written is then discarded whole: checkpoints are atomic). ``trainer.save_on_signal=false``
leaves Python's default handling alone.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

EXIT_PREEMPTED = 75

STOP_SIGNALS = ("SIGTERM", "SIGINT")
SAVE_SIGNAL = "SIGUSR1"


class TrainingInterrupted(Exception):  # noqa: N818 - an outcome, not a failure
    """Training stopped on SIGTERM/SIGINT after checkpointing the last completed step.

    Not an :class:`ldmkit.errors.LdmkitError`: nothing went wrong, and the run continues
    where it stopped when the same command is run again."""

    exit_code = EXIT_PREEMPTED

    def __init__(
        self, signal_name: str, step: int, checkpoint: Path | None, *, during: str | None = None
    ) -> None:
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        if during is not None:
            what = f"stopped by {signal_name} {during}"
        else:
            what = f"stopped by {signal_name} after step {step}"
        if checkpoint is not None:
            saved = f"checkpoint {checkpoint} holds the state after step {step}"
        else:
            saved = "no checkpoint was needed" if step else "nothing was trained yet"
        super().__init__(f"{what}; {saved}; run the same command again to resume")


class SignalWatch:
    """While active (a ``with`` block in the main thread), SIGTERM/SIGINT set :attr:`stop`
    and SIGUSR1 sets :attr:`save`; the previous handlers come back on exit."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.stop: str | None = None
        self.save = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalWatch:
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return self
        for name in (*STOP_SIGNALS, SAVE_SIGNAL):
            number = getattr(signal, name, None)
            if number is not None:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        sigchld = getattr(signal, "SIGCHLD", None)
        for number, handler in self._previous.items():
            # SIGCHLD (swapped only once a stop signal came) stays at the default: data workers
            # that signal ended stay registered with torch while the exception's traceback keeps
            # their iterator, and torch's handler would raise for them at the next child's exit,
            # wherever the program then is (the CLI printing the stop line)
            if number != sigchld:
                signal.signal(number, handler)
        self._previous.clear()

    @property
    def active(self) -> bool:
        return bool(self._previous)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if name == SAVE_SIGNAL:
            self.save = True
            _note(f"{name} received: a checkpoint follows the current step\n")
            return
        if self.stop is not None and name == "SIGINT":
            raise KeyboardInterrupt  # asked twice: stop now
        self.stop = self.stop or name
        sigchld = getattr(signal, "SIGCHLD", None)
        if sigchld is not None and sigchld not in self._previous:
            # A SIGTERM sent to the whole process group (Slurm) also ends the DataLoader
            # workers, and torch's SIGCHLD handler would raise that error in the middle of the
            # step; the loop notices dead workers at its next fetch instead, after saving.
            self._previous[sigchld] = signal.signal(sigchld, signal.SIG_DFL)
        _note(f"{name} received: finishing the current step, then checkpointing and exiting\n")

    def poll(self, world_size: int = 1) -> tuple[str | None, bool]:
        """``(stop signal or None, checkpoint requested)``, agreed by all ranks under torchrun
        (a signal that reached one rank stops them all after the same step)."""
        stop, save = self.stop, self.save
        self.save = False
        if world_size > 1:
            import torch
            import torch.distributed as dist

            codes = {name: i + 1 for i, name in enumerate(STOP_SIGNALS)}
            flags = torch.tensor([codes.get(stop or "", 0), int(save)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop = STOP_SIGNALS[int(flags[0]) - 1] if int(flags[0]) else None
            save = bool(flags[1])
            self.stop = self.stop or stop
        return stop, save


def _note(text: str) -> None:
    try:  # os.write: safe inside a signal handler, unlike print
        os.write(2, f"ldmkit: {text}".encode())
    except OSError:
        pass
