"""``python -m benchmarks [--json] [--quick]``: every benchmark side by side (see run.py)."""

import sys

from benchmarks.run import main

sys.exit(main())
