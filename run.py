"""Starts dynamo from a checkout: `python run.py` is the installed `dynamo` command
(dynamo/cli.py), with the same arguments, signals and exit codes."""

import sys

from dynamo.cli import main

if __name__ == "__main__":
    sys.exit(main())
