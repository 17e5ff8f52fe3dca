"""The Avro schemas of tagstream's records and the one codec that reads and writes them."""

from __future__ import annotations

from schemas.codec import RECORD_NAMES, Codec

__all__ = ["RECORD_NAMES", "Codec"]
