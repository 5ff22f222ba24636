"""``ldmkit plugins``: the installed plugins and what they register, as a table or JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from ldmkit.cli.common import CLIError, _Parser
from ldmkit.errors import LdmkitError


def plugins(argv: Sequence[str], *, prog: str, description: str) -> int:
    """Every installed plugin, loaded or not; then, on stderr, what clashes (exit 1)."""
    p = _Parser(prog=prog, description=description)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    from ldmkit.plugins import get_plugin_manager, misgrouped_entry_point_rows

    manager = get_plugin_manager()
    try:
        rows = manager.plugin_report()
        problems = manager.problems()
    except LdmkitError as err:
        raise CLIError(str(err)) from err
    ignored = misgrouped_entry_point_rows()  # installed, but never loaded: not in the table
    if args.json:
        print(json.dumps(rows + ignored, indent=2))
    else:
        note = manager.autoload_note()
        if note and any(row["status"] == "not loaded" for row in rows):
            print(f"{note}: the plugins marked 'not loaded' are installed but were not imported\n")
        print(format_plugin_table(rows))
    for row in ignored:
        print(f"{prog}: warning: {row['note']}", file=sys.stderr)
    for problem in problems:
        print(f"{prog}: error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def format_plugin_table(rows: list[dict]) -> str:
    if not rows:
        return "no ldmkit plugins installed"
    header = ("plugin", "distribution", "version", "registers", "config groups")
    table = [header]
    for row in rows:
        registers = "; ".join(f"{k}: {', '.join(v)}" for k, v in row["registers"].items()) or "-"
        groups = "; ".join(f"{k}: {', '.join(v)}" for k, v in row["config_groups"].items()) or "-"
        if row["error"]:
            registers, groups = f"BROKEN: {row['error']}", "-"
        elif row.get("status") == "not loaded":
            registers, groups = "not loaded", "-"
        table.append(
            (row["name"], row["distribution"] or "-", row["version"] or "-", registers, groups)
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    lines = []
    for r in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1])
    lines.insert(1, "-" * min(120, len(lines[0])))
    return "\n".join(lines)
