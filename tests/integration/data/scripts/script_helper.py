"""Helper module next to uses_helper.py."""


def shout(text: str) -> str:
    """``text`` in upper case with an exclamation mark."""
    return text.upper() + "!"
