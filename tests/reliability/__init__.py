"""The reliability suite: faults injected into a running pipeline, judged by one oracle.

See ``docs/reliability.md`` for the scenarios and the numbers measured.
"""
