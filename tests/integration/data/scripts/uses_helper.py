"""A script that imports a helper module from its own folder (shipped without being listed)."""

import sys

import script_helper

print(script_helper.shout(sys.argv[1]))
