"""A small project package the integration tests run on the testbed with ``@task``.

It lives under ``tests/integration/data`` (put on ``sys.path`` by the tests) and imports the top-level
helper module :mod:`rxhelper`, which nobody lists for distribution: the archive must find it by itself.
"""
