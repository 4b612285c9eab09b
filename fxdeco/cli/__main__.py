"""``python -m fxdeco.cli``: the ``fxdeco`` command."""

import sys

from fxdeco.cli import main

sys.exit(main())
