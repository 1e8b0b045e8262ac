"""``python -m fourbit ...``: the same as the ``fourbit`` console script (``fourbit.cli``)."""

import sys

from .cli import main

sys.exit(main())
