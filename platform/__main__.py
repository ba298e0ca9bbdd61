"""`python -m qdsize.platform` runs the command line."""

import sys

from qdsize.platform.cli import main

sys.exit(main())
