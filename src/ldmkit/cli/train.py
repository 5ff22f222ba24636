"""``ldmkit train`` and ``ldmkit evaluate``: compose the config, run the stage's trainer or evaluator."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from ldmkit.cli.common import CLIError, _compose, _optional_module, _parser
from ldmkit.errors import LdmkitError


def _run_stage(argv: Sequence[str], prog: str, description: str, module: str, function: str):
    """Compose the config from ``argv`` and call ``module.function(cfg)``."""
    args = _parser(prog, description).parse_args(argv)
    cfg = _compose(args.overrides, args.print_config, args.config_dir)
    if args.print_config:
        return None
    runner = getattr(_optional_module(module, f"{prog} (stage={cfg.get('stage')})"), function)
    try:
        return runner(cfg)
    except (LdmkitError, FileNotFoundError) as err:
        raise CLIError(str(err)) from err


def train(argv: Sequence[str], *, prog: str, description: str) -> int:
    """Exit codes: 0 done, 1 error, 75 (``EXIT_PREEMPTED``) stopped by SIGTERM/SIGINT after
    checkpointing: run the same command again to continue."""
    import signal
    import warnings

    default_show = warnings.showwarning

    # under torchrun every rank runs this; the ranks agree on what the trainer warns about
    # (resume notes, skipped checkpoints), so rank 0 alone says it, as it alone prints progress
    main_rank = os.environ.get("RANK", "0") == "0"

    def show(message, category, filename, lineno, file=None, line=None):
        # the trainer's own warnings, and data warnings every rank gives alike: one line each
        if category.__module__.startswith("ldmkit.training.") or getattr(category, "same_on_every_rank", False):
            if main_rank:
                print(f"{prog}: warning: {message}", file=file or sys.stderr)
        else:
            default_show(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    if hasattr(signal, "SIGUSR1"):  # "checkpoint now" before or after training: nothing to save, no reason to die
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        run_dir = _run_stage(argv, prog, description, "ldmkit.training", "train")
    except Exception as err:
        signals = sys.modules.get("ldmkit.training.signals")  # loaded if training started
        if signals is None or not isinstance(err, signals.TrainingInterrupted):
            raise
        print(f"{prog}: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        warnings.showwarning = default_show
    if run_dir is not None and main_rank:
        print(f"run directory: {run_dir}")
    return 0


def evaluate(argv: Sequence[str], *, prog: str, description: str) -> int:
    metrics = _run_stage(argv, prog, description, "ldmkit.evaluation", "evaluate")
    if metrics is not None:
        print(json.dumps(metrics, indent=2, default=str))
    return 0
