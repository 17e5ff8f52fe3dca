"""Deterministic demo images for the 13 classes of the demo model.

The demo runs without any downloaded data set: the image server draws its photos here,
and the demo model is trained on folders written here. Every class has a strong
signature (a background colour family and a drawn motif with its own palette) so that a
small network trained from scratch for a few CPU minutes separates them, and every seed
varies the nuisances (position, scale, rotation, mirroring, background tint and gradient,
faint clutter, brightness, noise) so that the task is not a lookup.

The same ``(cls, seed)`` always gives the same pixels: the only randomness is a NumPy
generator seeded from the class index and the seed, and drawing is plain Pillow.
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: Class names, sorted as torchvision's ImageFolder orders its folders.
DEMO_CLASSES: tuple[str, ...] = (
    "butterfly",
    "cats",
    "cow",
    "dogs",
    "elephant",
    "hen",
    "horse",
    "monkey",
    "others",
    "panda",
    "sheep",
    "spider",
    "squirrel",
)
_CLASS_INDEX = {name: i for i, name in enumerate(DEMO_CLASSES)}

#: write_demo_image_folder gives each folder seed a block this large of render seeds, so
#: folders written with different seeds never share an image.
SEED_BLOCK = 1_000_000

RGB = tuple[int, int, int]
Point = tuple[float, float]

# Background colour family per class: hue in degrees, saturation, value. Hues are spread
# around the wheel (and dark/light variants share none) because colour is what a network
# trained for minutes picks up first; "others" is grey of any brightness.
_BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "butterfly": (330.0, 0.30, 0.95),
    "cats": (265.0, 0.30, 0.85),
    "cow": (105.0, 0.55, 0.65),
    "dogs": (38.0, 0.30, 0.90),
    "elephant": (18.0, 0.55, 0.70),
    "hen": (52.0, 0.55, 0.92),
    "horse": (205.0, 0.45, 0.92),
    "monkey": (135.0, 0.65, 0.35),
    "panda": (85.0, 0.40, 0.85),
    "sheep": (175.0, 0.45, 0.70),
    "spider": (275.0, 0.35, 0.30),
    "squirrel": (220.0, 0.55, 0.40),
}

_N_ELLIPSE = 24
_COS = [math.cos(2 * math.pi * k / _N_ELLIPSE) for k in range(_N_ELLIPSE)]
_SIN = [math.sin(2 * math.pi * k / _N_ELLIPSE) for k in range(_N_ELLIPSE)]


def _hsv(h_deg: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(
        (h_deg % 360.0) / 360.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)
    )
    return (round(r * 255), round(g * 255), round(b * 255))


def _jit(rng: np.random.Generator, rgb: RGB, amount: int = 14) -> RGB:
    d = rng.integers(-amount, amount + 1, size=3)
    return (
        int(min(max(rgb[0] + d[0], 0), 255)),
        int(min(max(rgb[1] + d[1], 0), 255)),
        int(min(max(rgb[2] + d[2], 0), 255)),
    )


def _pick(rng: np.random.Generator, options: Sequence[RGB]) -> RGB:
    return _jit(rng, options[int(rng.integers(len(options)))])


class _Pen:
    """Draws in motif units (about -1..1, y down) mapped through scale, mirror and rotation.

    Ellipses are drawn as polygons because Pillow cannot rotate its own ellipses.
    """

    def __init__(
        self,
        draw: ImageDraw.ImageDraw,
        *,
        cx: float,
        cy: float,
        unit: float,
        angle_deg: float,
        mirror: bool,
    ) -> None:
        self._draw = draw
        self._cx, self._cy, self.unit = cx, cy, unit
        a = math.radians(angle_deg)
        self._c, self._s = math.cos(a), math.sin(a)
        self._sx = -1.0 if mirror else 1.0

    def pt(self, x: float, y: float) -> Point:
        x *= self._sx
        return (
            self._cx + (x * self._c - y * self._s) * self.unit,
            self._cy + (x * self._s + y * self._c) * self.unit,
        )

    def poly(self, pts: Sequence[Point], fill: RGB) -> None:
        self._draw.polygon([self.pt(x, y) for x, y in pts], fill=fill)

    def ellipse(
        self, x: float, y: float, rx: float, ry: float, fill: RGB, *, rot: float = 0.0
    ) -> None:
        cr, sr = math.cos(math.radians(rot)), math.sin(math.radians(rot))
        pts = []
        for c, s in zip(_COS, _SIN, strict=True):
            ex, ey = rx * c, ry * s
            pts.append((x + ex * cr - ey * sr, y + ex * sr + ey * cr))
        self.poly(pts, fill)

    def circle(self, x: float, y: float, r: float, fill: RGB) -> None:
        self.ellipse(x, y, r, r, fill)

    def line(self, pts: Sequence[Point], fill: RGB, width: float) -> None:
        self._draw.line(
            [self.pt(x, y) for x, y in pts],
            fill=fill,
            width=max(1, round(width * self.unit)),
            joint="curve",
        )

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill: RGB) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], fill)


BLACK: RGB = (22, 20, 20)
WHITE: RGB = (245, 244, 240)
PINK: RGB = (235, 130, 150)


def _butterfly(pen: _Pen, rng: np.random.Generator) -> None:
    wing, edge, spot = [
        ((255, 140, 0), (40, 30, 20), (255, 230, 80)),
        ((60, 90, 230), (20, 20, 60), (140, 220, 255)),
        ((250, 205, 40), (35, 30, 25), (235, 110, 30)),
        ((170, 60, 200), (40, 10, 60), (250, 200, 250)),
    ][int(rng.integers(4))]
    wing, edge, spot = _jit(rng, wing), _jit(rng, edge), _jit(rng, spot)
    # Both wings of a pair come from the same numbers: the mirror symmetry is the motif.
    for sx in (-1.0, 1.0):
        pen.ellipse(sx * 0.45, -0.25, 0.50, 0.36, edge, rot=sx * 25)
        pen.ellipse(sx * 0.45, -0.25, 0.42, 0.28, wing, rot=sx * 25)
        pen.ellipse(sx * 0.32, 0.32, 0.32, 0.27, edge, rot=-sx * 20)
        pen.ellipse(sx * 0.32, 0.32, 0.25, 0.20, wing, rot=-sx * 20)
        pen.circle(sx * 0.52, -0.30, 0.11, spot)
        pen.circle(sx * 0.32, 0.36, 0.08, spot)
        pen.line([(0.0, -0.35), (sx * 0.22, -0.85)], edge, 0.035)
        pen.circle(sx * 0.22, -0.85, 0.05, edge)
    pen.ellipse(0.0, 0.0, 0.07, 0.48, BLACK)


def _cats(pen: _Pen, rng: np.random.Generator) -> None:
    fur = _pick(rng, [(235, 140, 50), (225, 120, 40), (242, 172, 92)])
    dark = (fur[0] * 3 // 4, fur[1] * 3 // 5, fur[2] // 2)
    for sx in (-1.0, 1.0):
        # Pointed upright ears are what tells a cat from the dog's hanging ones.
        pen.poly([(sx * 0.55, -0.12), (sx * 0.44, -0.90), (sx * 0.06, -0.42)], fur)
        pen.poly([(sx * 0.45, -0.22), (sx * 0.40, -0.72), (sx * 0.17, -0.42)], PINK)
    pen.ellipse(0.0, 0.05, 0.60, 0.50, fur)
    for x in (-0.14, 0.0, 0.14):
        pen.line([(x, -0.42), (x * 0.8, -0.20)], dark, 0.05)
    for sx in (-1.0, 1.0):
        pen.ellipse(sx * 0.23, -0.02, 0.13, 0.10, (120, 205, 60))
        pen.ellipse(sx * 0.23, -0.02, 0.03, 0.09, BLACK)
        for dy in (-0.06, 0.06):
            pen.line([(sx * 0.12, 0.26), (sx * 0.78, 0.22 + dy * 2)], WHITE, 0.015)
    pen.poly([(-0.07, 0.15), (0.07, 0.15), (0.0, 0.24)], PINK)


def _dogs(pen: _Pen, rng: np.random.Generator) -> None:
    fur = _pick(rng, [(130, 80, 40), (155, 102, 58), (112, 72, 36)])
    ear = (fur[0] * 3 // 5, fur[1] * 3 // 5, fur[2] * 3 // 5)
    pen.ellipse(0.0, 0.0, 0.46, 0.56, fur)
    for sx in (-1.0, 1.0):
        # Long ears hanging down the sides of the head.
        pen.ellipse(sx * 0.50, 0.12, 0.17, 0.46, ear, rot=-sx * 15)
        pen.circle(sx * 0.18, -0.14, 0.075, BLACK)
        pen.circle(sx * 0.16, -0.16, 0.022, WHITE)
    pen.ellipse(0.0, 0.45, 0.07, 0.10, (230, 100, 120))
    pen.ellipse(0.0, 0.27, 0.28, 0.21, _jit(rng, (222, 192, 152)))
    pen.ellipse(0.0, 0.17, 0.11, 0.075, BLACK)
    pen.line([(0.0, 0.2), (0.0, 0.34)], BLACK, 0.02)


def _cow(pen: _Pen, rng: np.random.Generator) -> None:
    for x in (-0.52, -0.32, 0.30, 0.50):
        pen.rect(x - 0.065, 0.25, x + 0.065, 0.85, WHITE)
        pen.rect(x - 0.065, 0.76, x + 0.065, 0.85, BLACK)
    pen.ellipse(0.0, 0.05, 0.76, 0.42, WHITE)
    pen.ellipse(0.10, 0.43, 0.13, 0.08, PINK)
    for _ in range(int(rng.integers(3, 6))):
        pen.ellipse(
            float(rng.uniform(-0.55, 0.50)),
            float(rng.uniform(-0.15, 0.22)),
            float(rng.uniform(0.10, 0.22)),
            float(rng.uniform(0.08, 0.17)),
            BLACK,
            rot=float(rng.uniform(0, 180)),
        )
    pen.line([(0.72, -0.45), (0.64, -0.62)], (230, 225, 200), 0.04)
    pen.line([(0.92, -0.45), (1.00, -0.62)], (230, 225, 200), 0.04)
    pen.ellipse(0.82, -0.24, 0.20, 0.26, WHITE)
    pen.ellipse(0.78, -0.32, 0.10, 0.10, BLACK)
    pen.ellipse(0.86, -0.04, 0.15, 0.10, PINK)


def _elephant(pen: _Pen, rng: np.random.Generator) -> None:
    grey = _pick(rng, [(130, 130, 136), (150, 148, 150), (112, 112, 120)])
    darker = (grey[0] - 30, grey[1] - 30, grey[2] - 28)
    for x in (-0.50, -0.26, 0.18, 0.42):
        pen.rect(x - 0.11, 0.15, x + 0.11, 0.85, grey)
    pen.ellipse(-0.05, 0.0, 0.72, 0.52, grey)
    pen.circle(0.60, -0.22, 0.36, grey)
    pen.line([(0.82, -0.10), (0.97, 0.20), (0.97, 0.50), (0.86, 0.72)], grey, 0.15)
    pen.ellipse(0.42, -0.15, 0.26, 0.40, darker)
    pen.line([(0.76, 0.05), (0.92, 0.22)], WHITE, 0.05)
    pen.circle(0.72, -0.32, 0.04, BLACK)


def _hen(pen: _Pen, rng: np.random.Generator) -> None:
    body = _pick(rng, [(240, 235, 225), (172, 82, 40), (205, 135, 62)])
    red = _jit(rng, (222, 30, 30), 10)
    tail = _jit(rng, (30, 60, 40))
    for rot, dx in ((-20.0, 0.0), (-45.0, -0.06), (-70.0, -0.10)):
        pen.ellipse(-0.55 + dx, -0.18, 0.09, 0.32, tail, rot=rot)
    pen.ellipse(0.0, 0.15, 0.56, 0.42, body)
    pen.line([(0.0, 0.52), (-0.02, 0.86)], (230, 180, 40), 0.04)
    pen.line([(0.18, 0.52), (0.20, 0.86)], (230, 180, 40), 0.04)
    # The red comb and wattle: the hen's colour signature.
    for x, y, r in ((0.33, -0.58, 0.09), (0.45, -0.64, 0.10), (0.57, -0.58, 0.09)):
        pen.circle(x, y, r, red)
    pen.circle(0.45, -0.35, 0.21, body)
    pen.ellipse(0.60, -0.14, 0.06, 0.10, red)
    pen.poly([(0.62, -0.36), (0.84, -0.30), (0.62, -0.25)], (240, 190, 40))
    pen.circle(0.50, -0.39, 0.035, BLACK)


def _horse(pen: _Pen, rng: np.random.Generator) -> None:
    coat = _pick(rng, [(100, 55, 30), (142, 72, 36), (70, 45, 32)])
    for x in (-0.50, -0.35, 0.33, 0.48):
        pen.rect(x - 0.045, 0.15, x + 0.045, 0.86, coat)
        pen.rect(x - 0.05, 0.80, x + 0.05, 0.88, BLACK)
    pen.ellipse(0.0, 0.05, 0.62, 0.28, coat)
    pen.poly([(0.33, -0.08), (0.52, -0.66), (0.74, -0.56), (0.62, 0.05)], coat)
    pen.ellipse(0.80, -0.55, 0.26, 0.11, coat, rot=35)
    pen.poly([(0.48, -0.70), (0.56, -0.72), (0.38, -0.05), (0.28, -0.10)], BLACK)
    pen.line([(-0.60, -0.05), (-0.76, 0.20), (-0.80, 0.58)], BLACK, 0.08)
    pen.circle(0.78, -0.62, 0.03, BLACK)


def _monkey(pen: _Pen, rng: np.random.Generator) -> None:
    fur = _pick(rng, [(110, 70, 40), (90, 60, 40), (128, 84, 48)])
    face = _jit(rng, (226, 182, 142))
    for sx in (-1.0, 1.0):
        pen.circle(sx * 0.56, -0.02, 0.18, fur)
        pen.circle(sx * 0.56, -0.02, 0.10, face)
    pen.circle(0.0, 0.0, 0.50, fur)
    # Heart-shaped bare face: two eye discs over a wide muzzle.
    for sx in (-1.0, 1.0):
        pen.circle(sx * 0.17, -0.08, 0.20, face)
    pen.ellipse(0.0, 0.20, 0.31, 0.23, face)
    for sx in (-1.0, 1.0):
        pen.circle(sx * 0.17, -0.08, 0.06, BLACK)
        pen.circle(sx * 0.05, 0.15, 0.02, BLACK)
    pen.line([(-0.14, 0.30), (0.0, 0.34), (0.14, 0.30)], (90, 50, 40), 0.03)


def _panda(pen: _Pen, rng: np.random.Generator) -> None:
    white = _jit(rng, WHITE, 8)
    pen.ellipse(0.0, 0.78, 0.62, 0.40, white)
    for sx in (-1.0, 1.0):
        pen.ellipse(sx * 0.52, 0.70, 0.18, 0.32, BLACK, rot=sx * 20)
        pen.circle(sx * 0.42, -0.45, 0.18, BLACK)
    pen.circle(0.0, 0.0, 0.55, white)
    for sx in (-1.0, 1.0):
        pen.ellipse(sx * 0.22, -0.03, 0.12, 0.18, BLACK, rot=sx * 35)
        pen.circle(sx * 0.20, -0.06, 0.045, WHITE)
    pen.ellipse(0.0, 0.20, 0.08, 0.055, BLACK)
    pen.line([(-0.08, 0.32), (0.0, 0.28), (0.08, 0.32)], BLACK, 0.02)


def _sheep(pen: _Pen, rng: np.random.Generator) -> None:
    wool = _jit(rng, (240, 238, 228), 8)
    ring = (wool[0] - 45, wool[1] - 45, wool[2] - 45)
    for x in (-0.36, -0.16, 0.18, 0.38):
        pen.line([(x, 0.20), (x, 0.78)], BLACK, 0.06)
    # Fluffy outline: ring every puff first, then fill them all, so only the outer rim shows.
    puffs = []
    for k in range(11):
        t = 2 * math.pi * k / 11
        r = float(rng.uniform(0.18, 0.25))
        puffs.append((0.55 * math.cos(t), 0.30 * math.sin(t), r))
    for x, y, r in puffs:
        pen.circle(x, y, r + 0.03, ring)
    for x, y, r in puffs:
        pen.circle(x, y, r, wool)
    pen.ellipse(0.0, 0.0, 0.58, 0.34, wool)
    pen.ellipse(0.76, -0.20, 0.15, 0.07, (40, 35, 35), rot=-30)
    pen.ellipse(0.70, -0.08, 0.15, 0.21, (40, 35, 35))


def _spider(pen: _Pen, rng: np.random.Generator) -> None:
    web = _jit(rng, (205, 205, 215), 10)
    spokes = int(rng.integers(9, 13))
    angles = [2 * math.pi * (k + 0.3) / spokes for k in range(spokes)]
    for a in angles:
        pen.line([(0.0, 0.0), (1.5 * math.cos(a), 1.5 * math.sin(a))], web, 0.012)
    for radius in (0.35, 0.62, 0.90, 1.18, 1.46):
        ring = [(radius * math.cos(a), radius * math.sin(a)) for a in angles]
        pen.line([*ring, ring[0]], web, 0.012)
    leg = _pick(rng, [(20, 15, 15), (60, 20, 20)])
    # Eight jointed legs radiating from the body.
    for sx in (-1.0, 1.0):
        for k in range(4):
            a = math.radians(-60 + 38 * k)
            knee = (sx * 0.55 * math.cos(a), 0.55 * math.sin(a) - 0.25)
            b = a + math.radians(25 if k >= 2 else -25)
            foot = (knee[0] + sx * 0.45 * math.cos(b), knee[1] + 0.45 * math.sin(b) + 0.25)
            pen.line([(0.0, 0.0), knee, foot], leg, 0.05)
    pen.circle(0.0, -0.05, 0.17, leg)
    pen.ellipse(0.0, 0.30, 0.24, 0.30, leg)
    red = (210, 25, 25)
    pen.poly([(-0.08, 0.20), (0.08, 0.20), (0.0, 0.30)], red)
    pen.poly([(-0.08, 0.40), (0.08, 0.40), (0.0, 0.30)], red)


def _squirrel(pen: _Pen, rng: np.random.Generator) -> None:
    fur = _pick(rng, [(215, 110, 35), (200, 92, 30), (228, 128, 48)])
    tail = (fur[0] - 15, fur[1] - 20, fur[2])
    # Big bushy tail: overlapping puffs along a curve that rises behind the body.
    p0, p1, p2, p3 = (-0.25, 0.45), (-0.80, 0.25), (-0.75, -0.60), (-0.25, -0.72)
    for k in range(9):
        t = k / 8
        u = 1 - t
        x = u**3 * p0[0] + 3 * u * u * t * p1[0] + 3 * u * t * t * p2[0] + t**3 * p3[0]
        y = u**3 * p0[1] + 3 * u * u * t * p1[1] + 3 * u * t * t * p2[1] + t**3 * p3[1]
        pen.circle(x, y, 0.20 + 0.06 * math.sin(math.pi * t), tail)
    pen.ellipse(0.05, 0.16, 0.28, 0.38, fur)
    pen.ellipse(0.14, 0.24, 0.13, 0.24, (240, 215, 170))
    pen.poly([(0.12, -0.45), (0.14, -0.68), (0.26, -0.48)], fur)
    pen.circle(0.22, -0.32, 0.20, fur)
    pen.circle(0.28, -0.36, 0.035, BLACK)
    pen.ellipse(0.38, 0.05, 0.07, 0.09, (120, 75, 35))
    pen.ellipse(0.38, -0.03, 0.08, 0.04, (80, 55, 30))


_MOTIFS: dict[str, Callable[[_Pen, np.random.Generator], None]] = {
    "butterfly": _butterfly,
    "cats": _cats,
    "cow": _cow,
    "dogs": _dogs,
    "elephant": _elephant,
    "hen": _hen,
    "horse": _horse,
    "monkey": _monkey,
    "panda": _panda,
    "sheep": _sheep,
    "spider": _spider,
    "squirrel": _squirrel,
}

# Classes whose motif looks right at any angle get any rotation; animals stay roughly upright.
_FREE_ROTATION = frozenset({"spider", "butterfly"})


def _others(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    """Grey-ish textures without any motif: the 'none of the above' class."""

    def grey() -> RGB:
        return _hsv(
            float(rng.uniform(0, 360)), float(rng.uniform(0, 0.12)), float(rng.uniform(0.15, 0.9))
        )

    style = int(rng.integers(4))
    if style == 0:  # random blocks
        for _ in range(int(rng.integers(4, 10))):
            x0, y0 = rng.uniform(-0.2, 1.0, size=2) * size
            w, h = rng.uniform(0.1, 0.6, size=2) * size
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=grey())
    elif style == 1:  # stripes at an angle
        width = float(rng.uniform(0.05, 0.2)) * size
        a = float(rng.uniform(0, math.pi))
        dx, dy = math.cos(a) * size * 2, math.sin(a) * size * 2
        colours = (grey(), grey())
        for k in range(-20, 21):
            ox, oy = -math.sin(a) * k * width, math.cos(a) * k * width
            c = size / 2
            draw.line(
                [(c + ox - dx, c + oy - dy), (c + ox + dx, c + oy + dy)],
                fill=colours[k % 2],
                width=max(1, round(width / 2)),
            )
    elif style == 2:  # scattered rings and dots
        for _ in range(int(rng.integers(5, 14))):
            x, y = rng.uniform(0, 1, size=2) * size
            r = float(rng.uniform(0.03, 0.2)) * size
            draw.ellipse([x - r, y - r, x + r, y + r], outline=grey(), width=max(1, size // 40))
    # style 3: the gradient background alone


def _background(rng: np.random.Generator, cls: str, size: int) -> np.ndarray:
    if cls == "others":
        h, s, v = (
            float(rng.uniform(0, 360)),
            float(rng.uniform(0, 0.12)),
            float(rng.uniform(0.3, 0.8)),
        )
    else:
        h, s, v = _BACKGROUNDS[cls]
        h += float(rng.uniform(-10, 10))
        s *= float(rng.uniform(0.8, 1.2))
        v *= float(rng.uniform(0.85, 1.1))
    dv = float(rng.uniform(-0.12, 0.12))
    top = np.array(_hsv(h, s, v + dv), dtype=np.float32)
    bottom = np.array(_hsv(h, s, v - dv), dtype=np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    column = top * (1 - t) + bottom * t
    return np.broadcast_to(column, (size, size, 3))


def render_demo_image(cls: str, seed: int, *, size: int = 160) -> Image.Image:
    """One RGB demo photo of class `cls`; the same ``(cls, seed, size)`` gives the same pixels."""
    if cls not in _CLASS_INDEX:
        raise KeyError(f"unknown demo class {cls!r}; known: {', '.join(DEMO_CLASSES)}")
    if size < 16:
        raise ValueError(f"size must be at least 16 px, got {size}")
    # SeedSequence wants non-negative entropy; the modulo keeps negative seeds usable.
    rng = np.random.default_rng([0x7A65, _CLASS_INDEX[cls], seed % 2**63])
    img = Image.fromarray(_background(rng, cls, size).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)

    # Faint clutter close to the background colour, so the background is never flat.
    base = img.getpixel((size // 2, size // 2))
    for _ in range(int(rng.integers(1, 4))):
        x, y = rng.uniform(0, 1, size=2) * size
        rx, ry = rng.uniform(0.05, 0.25, size=2) * size
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=_jit(rng, base, 22))  # type: ignore[arg-type]

    if cls == "others":
        _others(draw, rng, size)
    else:
        free = cls in _FREE_ROTATION
        pen = _Pen(
            draw,
            cx=size * (0.5 + float(rng.uniform(-0.12, 0.12))),
            cy=size * (0.5 + float(rng.uniform(-0.12, 0.12))),
            unit=size * 0.36 * float(rng.uniform(0.75, 1.1)),
            angle_deg=float(rng.uniform(-180, 180) if free else rng.uniform(-20, 20)),
            mirror=bool(rng.integers(2)),
        )
        _MOTIFS[cls](pen, rng)

    arr = np.asarray(img, dtype=np.float32) * float(rng.uniform(0.85, 1.15))
    arr += rng.normal(0.0, float(rng.uniform(2.0, 9.0)), size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def render_demo_jpeg(cls: str, seed: int, *, size: int = 160, quality: int = 90) -> bytes:
    """`render_demo_image` encoded as JPEG bytes (what the demo image server sends)."""
    buf = io.BytesIO()
    render_demo_image(cls, seed, size=size).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def render_demo_photo(cls: str, seed: int, *, width: int = 1200, height: int = 900) -> Image.Image:
    """A demo image the size tweets carry (X serves photos up to 1200x900): the square
    demo image at `height`, widened to `width` by mirroring its sides, so a centre crop
    sees exactly the square demo image (and the demo model its class), while the pixels
    keep the square image's noise, which makes the JPEG as large as a real photo's."""
    if width < height:
        raise ValueError(f"a landscape photo: width {width} must be at least height {height}")
    square = np.asarray(render_demo_image(cls, seed, size=height))
    left = (width - height) // 2
    wide = np.pad(square, ((0, 0), (left, width - height - left), (0, 0)), mode="reflect")
    return Image.fromarray(wide, "RGB")


def render_demo_photo_jpeg(
    cls: str, seed: int, *, width: int = 1200, height: int = 900, quality: int = 85
) -> bytes:
    """`render_demo_photo` as a JPEG (about 160 KB at 1200x900, as a tweet's photo)."""
    buf = io.BytesIO()
    render_demo_photo(cls, seed, width=width, height=height).save(
        buf, format="JPEG", quality=quality
    )
    return buf.getvalue()


def write_demo_image_folder(root: Path, *, per_class: int, size: int, seed: int) -> None:
    """Write ``root/<class>/<n>.png`` for n in ``range(per_class)``, an ImageFolder tree.

    Image n of a class is rendered with seed ``seed * SEED_BLOCK + n``: folders written with
    different `seed` values (say 0 for training, 1 for validation) share no image.
    """
    if not 0 < per_class <= SEED_BLOCK:
        raise ValueError(f"per_class must be in 1..{SEED_BLOCK}, got {per_class}")
    for cls in DEMO_CLASSES:
        folder = Path(root) / cls
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            render_demo_image(cls, seed * SEED_BLOCK + n, size=size).save(folder / f"{n}.png")
