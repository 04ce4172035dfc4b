"""``python -m remote_exec``: the ``rx`` command line."""

from remote_exec.cli import main

if __name__ == "__main__":
    main()
