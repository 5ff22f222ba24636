"""``ldmkit demo``: serve :mod:`ldmkit.demo`'s page."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ldmkit.cli.common import CLIError, _Parser
from ldmkit.errors import LdmkitError


def demo(argv: Sequence[str], *, prog: str, description: str) -> int:
    """Serve ``ldmkit.demo``'s page until Ctrl-C (or SIGTERM); Gradio comes from the
    optional ``demo`` extra."""
    p = _Parser(prog=prog, description=description)
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint folder written by Pipeline.save")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 serves "
                        "everyone who can reach it, with no login)")
    p.add_argument("--port", type=int, default=7860, help="the port to listen on (default 7860)")
    p.add_argument("--queue-size", type=int, default=8,
                   help="requests that may wait while one samples (default 8); more are turned away")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    args = p.parse_args(argv)
    if not 1 <= args.port <= 65535:
        raise CLIError(f"--port must be in 1..65535, got {args.port}")
    if args.queue_size < 1:
        raise CLIError(f"--queue-size must be >= 1, got {args.queue_size}")
    from ldmkit.demo.server import serve
    try:
        return serve(checkpoint=args.checkpoint, host=args.host, port=args.port,
                     queue_size=args.queue_size, device=args.device)
    except ModuleNotFoundError as err:
        if err.name != "gradio":
            raise
        raise CLIError("the demo needs Gradio, which is not installed: pip install 'ldmkit[demo]'") from None
    except (LdmkitError, FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from err
    except OSError as err:  # the port is taken, or the address is not this machine's
        raise CLIError(f"cannot serve on {args.host}:{args.port}: {err}") from err
