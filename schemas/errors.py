"""The errors the schemas layer raises: the root of tagstream's hierarchy, CodecError and
RegistryUnavailableError.

They live here, at the bottom of the layers, because the codec raises CodecError and
nothing in schemas/ may import from above it. infra/exceptions.py re-exports both and
draws the whole hierarchy; import them from there everywhere else.
"""

from __future__ import annotations


class TagstreamError(Exception):
    """Base class of every error tagstream raises on purpose."""


class CodecError(TagstreamError):
    """A record that cannot be encoded or decoded."""


class RegistryUnavailableError(TagstreamError):
    """The schema registry did not answer (refused, timed out, 408, 429 or 5xx after the
    client's own retries): nothing is wrong with the record, so it is not a CodecError
    and never a dead letter. Callers wait and try again, or stop without committing."""
