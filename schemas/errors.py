"""The two errors the schemas layer raises: the root of tagstream's hierarchy and CodecError.

They live here, at the bottom of the layers, because the codec raises CodecError and
nothing in schemas/ may import from above it. infra/exceptions.py re-exports both and
draws the whole hierarchy; import them from there everywhere else.
"""

from __future__ import annotations


class TagstreamError(Exception):
    """Base class of every error tagstream raises on purpose."""


class CodecError(TagstreamError):
    """A record that cannot be encoded or decoded."""
