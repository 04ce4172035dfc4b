"""Exits with the status given as the first argument, after one line on stdout and one on stderr."""

import sys

code = int(sys.argv[1])
print(f"exiting with {code}")
print(f"about to exit {code}", file=sys.stderr)
sys.exit(code)
