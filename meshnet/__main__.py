"""``python -m meshnet`` is the ``meshnet`` command."""

import sys

from meshnet.cli import main

sys.exit(main())
