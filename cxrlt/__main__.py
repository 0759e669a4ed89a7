"""`python -m cxrlt ...`: the same command line as the `cxrlt` console script."""

import sys

from cxrlt.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
