"""The runner protocol: how the coordinator and the runner on a host talk.

:mod:`.wire` (frames, their encodings, the result's HMAC) travels to the remote inside the distribution
archive and is imported by the runner on every call, so this package's ``__init__`` imports nothing.
"""
