#!/usr/bin/env python3
"""Command line of clipq-search; see README.md or `python run_search.py --help`."""

import sys

from clipq_search.cli import main

if __name__ == "__main__":
    sys.exit(main())
