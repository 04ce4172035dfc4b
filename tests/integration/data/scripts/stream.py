"""Prints a line, flushes, sleeps 2 s, prints another: the first must reach the terminal before the end."""

import time

print("first line", flush=True)
time.sleep(2)
print("second line", flush=True)
