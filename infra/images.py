"""What every decode path shares: turning a photo upright.

Phones write JPEGs in the sensor's orientation with an EXIF orientation tag; a viewer
turns them, and so must we before a model (or a perceptual hash) sees them. The serving
preset (models/presets.py), the training loader and the teacher's scoring, and
`tagstream collect` all call `upright`.
"""

from __future__ import annotations

import logging

from PIL import Image, ImageOps

log = logging.getLogger(__name__)


def upright(image: Image.Image) -> Image.Image:
    """`image` turned as its EXIF orientation tag says; as it is without a tag.

    A malformed EXIF block is no reason to refuse a photo that decodes: it is then used
    as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # Pillow raises many types on a hostile EXIF block
        log.debug("EXIF orientation ignored: %s: %s", type(exc).__name__, exc)
        return image
