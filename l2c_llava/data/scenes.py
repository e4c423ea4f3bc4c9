"""Procedural scenes: sampling a scene graph and drawing it with PIL.

A scene is 2-5 groups of identical objects on a patterned background. Each group has a shape, a
colour, a size, a count (1-4), a fill style, an optional tilt, and occupies one cell of a 3x3 grid,
so every group has an unambiguous position ("top left", "center"...) and pairwise relations
("to the left of", "above") that the captions and questions can state truthfully.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "pentagon", "diamond", "cross")
PLURAL = {s: s + "s" for s in SHAPES} | {"cross": "crosses"}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (245, 205, 30),
    "orange": (255, 127, 14),
    "purple": (128, 60, 170),
    "pink": (240, 120, 190),
    "brown": (140, 86, 45),
    "black": (25, 25, 25),
    "white": (248, 248, 248),
    "gray": (127, 127, 127),
    "cyan": (23, 190, 207),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "light gray": (222, 222, 222),
    "beige": (235, 222, 190),
    "pale blue": (200, 225, 245),
    "pale green": (210, 240, 210),
    "cream": (250, 245, 225),
    "lavender": (225, 215, 245),
    "dark navy": (25, 35, 70),
    "charcoal": (52, 52, 58),
    "sand": (220, 200, 160),
    "mint": (190, 235, 215),
    "peach": (250, 215, 190),
    "olive": (110, 120, 60),
}
PATTERNS = ("plain", "gradient", "stripes", "checker", "dots", "grain")
SIZES = {"small": 0.045, "medium": 0.07, "large": 0.115}  # radius as a fraction of the image side
POSITIONS = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
MIN_CONTRAST = 130.0  # euclidean RGB distance between an object and its background
SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges like a real photo of a drawing


@dataclass
class Background:
    colour: str
    pattern: str
    colour2: str | None = None  # gradient end colour
    direction: str | None = None  # stripes / gradient direction


@dataclass
class Group:
    shape: str
    colour: str
    size: str
    count: int
    row: int
    col: int
    style: str  # "solid" | "outlined"
    tilt: float  # degrees, 0 = upright
    boxes: list[list[int]] = field(default_factory=list)  # pixel boxes of the instances, filled when drawn

    @property
    def position(self) -> str:
        return POSITIONS[(self.row, self.col)]


@dataclass
class Scene:
    index: int
    background: Background
    groups: list[Group]

    @property
    def total(self) -> int:
        return sum(g.count for g in self.groups)

    def present(self) -> set[tuple[str, str]]:
        return {(g.colour, g.shape) for g in self.groups}

    def to_json(self) -> dict:
        return {
            "background": asdict(self.background),
            "groups": [asdict(g) | {"position": g.position} for g in self.groups],
        }


def _dist(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return math.dist(a, b)


def sample_scene(rng: random.Random, index: int, max_groups: int = 5) -> Scene:
    """Draw a random scene graph (no pixels yet)."""
    bg_name = rng.choice(list(BACKGROUNDS))
    pattern = rng.choice(PATTERNS)
    bg = Background(colour=bg_name, pattern=pattern)
    bg_cols = [BACKGROUNDS[bg_name]]
    if pattern == "gradient":
        near = [n for n in BACKGROUNDS if n != bg_name and _dist(BACKGROUNDS[n], BACKGROUNDS[bg_name]) < 120]
        bg.colour2 = rng.choice(near or [n for n in BACKGROUNDS if n != bg_name])
        bg.direction = rng.choice(("top", "left"))
        bg_cols.append(BACKGROUNDS[bg.colour2])
    elif pattern == "stripes":
        bg.direction = rng.choice(("horizontal", "vertical", "diagonal"))
    usable = [c for c, rgb in COLOURS.items() if all(_dist(rgb, b) >= MIN_CONTRAST for b in bg_cols)]

    n_groups = rng.randint(2, max(2, min(max_groups, 9)))
    cells = rng.sample(sorted(POSITIONS), n_groups)
    groups: list[Group] = []
    seen: set[tuple[str, str]] = set()
    for row, col in sorted(cells):
        while True:  # (colour, shape) unique per scene, so "the red circle" names one group
            shape, colour = rng.choice(SHAPES), rng.choice(usable)
            if (colour, shape) not in seen:
                seen.add((colour, shape))
                break
        count = rng.choices((1, 2, 3, 4), weights=(0.55, 0.2, 0.15, 0.1))[0]
        size = rng.choice(("small", "medium", "large") if count == 1 else ("small", "medium"))
        style = "outlined" if rng.random() < 0.3 else "solid"
        tilt = 0.0 if shape == "circle" or rng.random() < 0.65 else round(rng.uniform(12, 33), 1)
        groups.append(Group(shape, colour, size, count, row, col, style, tilt))
    return Scene(index=index, background=bg, groups=groups)


# ---------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------


def _shape_points(shape: str, cx: float, cy: float, r: float, tilt: float) -> list[tuple[float, float]]:
    def regular(n: int, radius: float, start: float) -> list[tuple[float, float]]:
        return [
            (radius * math.cos(start + 2 * math.pi * k / n), radius * math.sin(start + 2 * math.pi * k / n))
            for k in range(n)
        ]

    up = -math.pi / 2
    if shape == "square":
        pts = regular(4, r * 1.2, math.pi / 4)
    elif shape == "triangle":
        pts = [(x, y + 0.2 * r) for x, y in regular(3, r * 1.15, up)]
    elif shape == "pentagon":
        pts = regular(5, r * 1.05, up)
    elif shape == "hexagon":
        pts = regular(6, r * 1.05, 0.0)
    elif shape == "diamond":
        pts = [(0, -r * 1.15), (r * 0.75, 0), (0, r * 1.15), (-r * 0.75, 0)]
    elif shape == "star":
        pts = [
            (
                (r * 1.15 if k % 2 == 0 else r * 0.48) * math.cos(up + math.pi * k / 5),
                (r * 1.15 if k % 2 == 0 else r * 0.48) * math.sin(up + math.pi * k / 5),
            )
            for k in range(10)
        ]
    elif shape == "cross":
        a, w = r * 1.05, r * 0.36
        pts = [
            (-w, -a),
            (w, -a),
            (w, -w),
            (a, -w),
            (a, w),
            (w, w),
            (w, a),
            (-w, a),
            (-w, w),
            (-a, w),
            (-a, -w),
            (-w, -w),
        ]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    t = math.radians(tilt)
    c, s = math.cos(t), math.sin(t)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _background(bg: Background, side: int, rng: np.random.Generator) -> Image.Image:
    """Background pattern at `side` pixels (masks built by broadcasting 1-D coordinates: cheap)."""
    base_rgb = BACKGROUNDS[bg.colour]
    base = np.array(base_rgb, dtype=np.float32)
    if bg.pattern in ("plain", "grain"):
        return Image.new("RGB", (side, side), base_rgb)
    if bg.pattern == "gradient":
        t = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None]
        line = (base * (1 - t) + np.array(BACKGROUNDS[bg.colour2], dtype=np.float32) * t).astype(np.uint8)
        arr = np.broadcast_to(
            line[:, None, :] if bg.direction == "top" else line[None, :, :], (side, side, 3)
        )
        return Image.fromarray(np.ascontiguousarray(arr), "RGB")
    coord = np.arange(side, dtype=np.float32) / side
    yy, xx = coord[:, None], coord[None, :]
    shade = base * 0.85 if base.mean() > 100 else np.minimum(base * 1.35 + 20, 255)
    if bg.pattern == "stripes":
        period = rng.uniform(0.04, 0.08)
        c = {"horizontal": yy + 0 * xx, "vertical": xx + 0 * yy, "diagonal": (xx + yy) / 2}[bg.direction]
        mask = np.floor(c / period) % 2 == 1
    elif bg.pattern == "checker":
        period = rng.uniform(0.06, 0.12)
        mask = (np.floor(xx / period) + np.floor(yy / period)) % 2 == 1
        shade = (base + shade) / 2
    elif bg.pattern == "dots":
        period = rng.uniform(0.05, 0.09)
        mask = (((xx / period) % 1 - 0.5) ** 2 + ((yy / period) % 1 - 0.5) ** 2) < 0.04
    else:
        raise ValueError(f"unknown background pattern {bg.pattern!r}")
    fg = Image.new("RGB", (side, side), tuple(int(v) for v in shade))
    return Image.composite(
        fg, Image.new("RGB", (side, side), base_rgb), Image.fromarray(mask.astype(np.uint8) * 255, "L")
    )


def _add_noise(img: Image.Image, grain: bool, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32)
    h, w, _ = arr.shape
    noise = rng.standard_normal((h, w, 3), dtype=np.float32) * 3.0  # a little sensor-like noise everywhere
    if grain:
        noise += rng.standard_normal((h, w, 1), dtype=np.float32) * 14.0
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8), "RGB")


def _instance_centres(count: int, cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    q = half / 2
    return {
        1: [(cx, cy)],
        2: [(cx - q, cy), (cx + q, cy)],
        3: [(cx - q, cy + q), (cx + q, cy + q), (cx, cy - q)],
        4: [(cx - q, cy - q), (cx + q, cy - q), (cx - q, cy + q), (cx + q, cy + q)],
    }[count]


def render_scene(scene: Scene, size: int, seed: int) -> Image.Image:
    """Draw `scene` at `size` x `size` pixels; fills each group's instance boxes (in output pixels)."""
    side = size * SUPERSAMPLE
    nrng = np.random.default_rng([seed, scene.index, 1])
    img = _background(scene.background, side, nrng)
    draw = ImageDraw.Draw(img)
    jitter = random.Random(f"{seed}-{scene.index}-jitter")
    cell = side / 3
    for g in scene.groups:
        r = SIZES[g.size] * side
        half = cell / 2
        spread = 0.0 if g.count == 1 else half / 2  # instance offset from the group centre
        room = max(0.0, half - spread - 1.2 * r - 0.02 * side)  # keeps every instance inside its cell
        cx = (g.col + 0.5) * cell + jitter.uniform(-room, room)
        cy = (g.row + 0.5) * cell + jitter.uniform(-room, room)
        g.boxes = []
        for x, y in _instance_centres(g.count, cx, cy, half):
            rgb = COLOURS[g.colour]
            width = max(2, int(r * 0.28))
            if g.shape == "circle":
                box = (x - r, y - r, x + r, y + r)
                if g.style == "solid":
                    draw.ellipse(box, fill=rgb)
                else:
                    draw.ellipse(box, outline=rgb, width=width)
                pts = [(box[0], box[1]), (box[2], box[3])]
            else:
                pts = _shape_points(g.shape, x, y, r, g.tilt)
                if g.style == "solid":
                    draw.polygon(pts, fill=rgb)
                else:
                    draw.polygon(pts, outline=rgb, width=width)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            box = (min(xs), min(ys), max(xs), max(ys))
            g.boxes.append([min(size, max(0, round(v / SUPERSAMPLE))) for v in box])
    return _add_noise(img.resize((size, size), Image.LANCZOS), scene.background.pattern == "grain", nrng)
