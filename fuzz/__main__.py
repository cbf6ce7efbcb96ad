"""`python -m fuzz`: the runner (fuzz/run.py)."""

import sys

from fuzz.run import main

sys.exit(main())
