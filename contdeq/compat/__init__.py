"""Entry points that accept another library's spellings and run contdeq underneath.

* :mod:`contdeq.compat.torchdeq`: torchdeq 0.1.0's ``get_deq(**kwargs)`` (docs/migration.md).
"""
