"""``python -m ldmkit ...`` is the ``ldmkit`` command."""

from ldmkit.cli import run

run()
