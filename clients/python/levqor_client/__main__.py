"""``python -m levqor_client``: the ``levqor`` command line."""

import sys

from .cli import main

sys.exit(main())
