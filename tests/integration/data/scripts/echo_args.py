"""Records what it received, as bytes: its arguments, its script name and the RX_PROBE_* environment.

Writes ``received.json`` in its working directory (pulled back by rx) and prints the same JSON.
"""

import json
import os
import sys

received = {
    "script": os.path.basename(sys.argv[0]),
    "args_hex": [os.fsencode(arg).hex() for arg in sys.argv[1:]],
    "env_hex": {name: os.fsencode(value).hex() for name, value in os.environ.items() if name.startswith("RX_PROBE_")},
    "cwd": os.getcwd(),
}
text = json.dumps(received, sort_keys=True)
with open("received.json", "w", encoding="utf-8") as stream:
    stream.write(text)
print(text)
