"""The composition root: the `tagstream` command, `tagstream up` and the pipeline benchmark.

The only package that may import every other one (producers, processors, models and the
floor); see docs/architecture.md.
"""
