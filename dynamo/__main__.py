"""`python -m dynamo`: the same as the `dynamo` command (dynamo/cli.py)."""

import sys

from dynamo.cli import main

if __name__ == "__main__":
    sys.exit(main())
