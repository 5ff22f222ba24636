"""``python -m ldmkit ...`` is the ``ldmkit`` command."""

import sys

from ldmkit.cli import main

sys.exit(main())
