"""Exceptions of tagstream.

TagstreamError
├── ConfigurationError       settings that cannot work
├── BrokerError              the broker did not start or answer
├── CodecError               a record that cannot be encoded or decoded
├── RegistryUnavailableError  the schema registry did not answer (the record is fine)
├── FetchError               an image that could not be fetched
│   ├── TransientFetchError  worth a retry (timeouts, 5xx, connection reset)
│   └── RejectedFetchError   never worth a retry (4xx, not an image, too big, blocked)
├── DecodeImageError         fetched bytes that Pillow cannot decode
├── ModelError               a model or manifest that cannot be used
├── DeliveryError (a BrokerError, in infra/record_producer.py)  a record the broker refused
└── EvaluationError          an evaluation that could not run to its end
"""

from __future__ import annotations

# Defined in the lowest layer, where the codec raises them; re-exported here with the rest.
from schemas.errors import CodecError, RegistryUnavailableError, TagstreamError

__all__ = [
    "BrokerError",
    "CodecError",
    "ConfigurationError",
    "DecodeImageError",
    "EvaluationError",
    "FetchError",
    "ModelError",
    "RegistryUnavailableError",
    "RejectedFetchError",
    "TagstreamError",
    "TransientFetchError",
]


class ConfigurationError(TagstreamError):
    """Settings that cannot work."""


class BrokerError(TagstreamError):
    """The broker did not start or did not answer."""


class FetchError(TagstreamError):
    """An image that could not be fetched. `cause` says why in one word (timeout, http_4xx,
    not_image, ...): the label of the fetch-failure metric, so never a URL."""

    def __init__(self, message: str = "", *, cause: str = "other") -> None:
        super().__init__(message)
        self.cause = cause


class TransientFetchError(FetchError):
    """A fetch failure worth retrying: timeout, 5xx, connection reset."""


class RejectedFetchError(FetchError):
    """A fetch failure never worth retrying: 4xx, not an image, too large, blocked address."""


class DecodeImageError(TagstreamError):
    """Fetched bytes that cannot be decoded as an image."""


class ModelError(TagstreamError):
    """A model file or manifest that cannot be used."""


class EvaluationError(TagstreamError):
    """An evaluation that could not run to its end: a process of its pipeline exited, or
    the pipeline never answered."""
