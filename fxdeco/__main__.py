"""``python -m fxdeco``: the ``fxdeco`` command (as ``python -m fxdeco.cli``)."""

import sys

from fxdeco.cli import main

sys.exit(main())
