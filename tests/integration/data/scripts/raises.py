"""Raises an uncaught exception from a function, as a script run with `python` would report it."""


def explode(reason: str) -> None:
    raise RuntimeError(f"exploded: {reason}")


print("before the explosion", flush=True)
explode("on purpose")
