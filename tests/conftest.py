"""Shared test configuration.

Its presence puts ``tests/`` on ``sys.path`` (pytest's default import mode), which is how the
test modules in sub-folders import the shared builders in ``tests/_models.py``.
"""
