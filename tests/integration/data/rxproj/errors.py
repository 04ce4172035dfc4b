"""An exception type of the project, so a remote failure can come back as its own type."""

from __future__ import annotations


class BadInput(ValueError):
    """The task was given something it cannot work with.

    Attributes:
        value: The offending value.
    """

    def __init__(self, message: str, value: object = None) -> None:
        super().__init__(message)
        self.value = value
