"""`python -m sd3 ...`: the `sd3` command (e.g. under torchrun)."""

import sys

from .cli import main

sys.exit(main())
