"""Writes files in its working directory (one in a subdirectory) and prints their sha256 as JSON.

The content is derived from the first argument, so a test can predict every byte.
"""

import hashlib
import json
import os
import sys

seed = sys.argv[1] if len(sys.argv) > 1 else "seed"
files = {
    "a.txt": f"alpha {seed}\n".encode(),
    "sub/b.txt": f"beta {seed}\nü€\n".encode(),
    "sub/deeper/c.txt": f"gamma {seed}\n".encode(),
    "data.bin": bytes(range(256)) * 64 + seed.encode(),
}
for name, content in files.items():
    os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
    with open(name, "wb") as stream:
        stream.write(content)
print(json.dumps({name: hashlib.sha256(content).hexdigest() for name, content in files.items()}))
