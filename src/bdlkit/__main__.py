"""``python -m bdlkit`` is the same as the ``bdlkit`` command."""

import sys

from .cli import main

sys.exit(main())
