"""``python -m pipelines.demo``: the demo job (see the package docstring)."""

import sys

from . import main

sys.exit(main())
