import sys

from npudispatch.cli import main

sys.exit(main())
