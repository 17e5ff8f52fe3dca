"""The composition root: the `tagstream` command, `tagstream up`, the pipeline benchmark and
the evaluation by replay.

The only package that may import every other one (producers, processors, models and the
floor); see docs/architecture.md.
"""
