"""``python -m sidecar``: the same entry point as the ``traffic-color`` script."""

import sys

from sidecar.cli import main

sys.exit(main())
