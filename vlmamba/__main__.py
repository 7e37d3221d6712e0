"""`python -m vlmamba TOOL ...`: the same as the `vlmamba` command."""

import sys

from vlmamba.cli import main

sys.exit(main())
