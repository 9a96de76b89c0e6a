"""`python -m training.annotation COMMAND ...`: the same command line as `omniattr annotate`."""

import sys

from training.annotation.cli import main

sys.exit(main())
