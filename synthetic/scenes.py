"""Procedural flat-colour scenes: the project's whole synthetic image domain.

Every fact a caption states (kind, colour, size, position, background) is
known exactly, so captioners and text-to-image models trained on these scenes
can be scored against ground truth rather than against another model.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")

# Pairwise RGB distance >= ~100 so colours stay separable after JPEG
# chroma subsampling and a nearest-colour lookup.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 130, 0),
    "yellow": (250, 225, 30),
    "green": (30, 160, 50),
    "cyan": (0, 200, 210),
    "blue": (30, 60, 200),
    "purple": (130, 40, 170),
    "pink": (250, 140, 200),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (120, 70, 25),
}

# Object extent (side of its bounding square) as a fraction of the image's
# shorter side.
SIZES: dict[str, float] = {"small": 0.2, "medium": 0.32, "large": 0.45}

# Row-major 3x3 grid: POSITIONS[row * 3 + col].
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
POSITION_PHRASES: dict[str, str] = {
    p: ("in the center" if p == "center" else f"on the {p}" if p in ("left", "right") else f"at the {p}")
    for p in POSITIONS
}

TEXTURES: tuple[str, ...] = ("plain", "stripes", "checker", "gradient", "noise")
TEXTURE_ADJECTIVES: dict[str, str] = {
    "plain": "plain", "stripes": "striped", "checker": "checkered", "gradient": "gradient", "noise": "noisy",
}

_OVERLAP_MARGIN = 2  # px kept free between bounding squares so JPEG ringing doesn't merge objects
_PLACEMENT_TRIES = 30
_SCENE_TRIES = 20


@dataclass(frozen=True)
class SceneOptions:
    min_objects: int = 1
    max_objects: int = 3
    image_sizes: tuple[tuple[int, int], ...] = (
        (64, 64), (96, 64), (64, 96), (96, 96), (128, 96), (96, 128),
        (128, 128), (160, 96), (96, 160), (160, 128), (128, 160), (160, 160),
    )
    textured_fraction: float = 0.3
    allow_overlap: bool = False


@dataclass(frozen=True)
class SceneObject:
    kind: str
    colour: str
    size: str
    centre: tuple[int, int]
    extent: int
    bbox: tuple[int, int, int, int]  # bounding square x, y, w, h; the shape lies inside it
    position: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneObject:
        return cls(
            kind=d["kind"], colour=d["colour"], size=d["size"], centre=tuple(d["centre"]),
            extent=int(d["extent"]), bbox=tuple(d["bbox"]), position=d["position"],
        )


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str
    texture: str
    objects: tuple[SceneObject, ...]
    texture_seed: int = 0  # makes the "noise" texture a pure function of the scene

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["objects"] = [o.to_dict() for o in self.objects]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(
            width=int(d["width"]), height=int(d["height"]), background=d["background"],
            texture=d["texture"], objects=tuple(SceneObject.from_dict(o) for o in d["objects"]),
            texture_seed=int(d.get("texture_seed", 0)),
        )


def position_of(x: float, y: float, width: int, height: int) -> str:
    col = min(2, max(0, int(3 * x // width)))
    row = min(2, max(0, int(3 * y // height)))
    return POSITIONS[row * 3 + col]


# --------------------------------------------------------------------------- sampling

def _centre_range(cell: int, n: int, extent: int, inset: bool) -> tuple[int, int]:
    """Integer centres on one axis whose cell is `cell` and whose square fits in [0, n)."""
    lo_cell, hi_cell = cell * n / 3, (cell + 1) * n / 3
    pad = 0.15 * n / 3 if inset else 0.0  # keeps centres off cell borders so position words are unambiguous
    lo = max(math.ceil(lo_cell + pad), extent // 2)
    hi = min(math.ceil(hi_cell - pad) - 1, n - extent + extent // 2)
    return lo, hi


def _sample_centre(rng: np.random.Generator, width: int, height: int, extent: int, cell: int) -> tuple[int, int] | None:
    row, col = divmod(cell, 3)
    centre = []
    for c, n in ((col, width), (row, height)):
        lo, hi = _centre_range(c, n, extent, inset=True)
        if lo > hi:
            lo, hi = _centre_range(c, n, extent, inset=False)
        if lo > hi:
            return None
        centre.append(int(rng.integers(lo, hi + 1)))
    return centre[0], centre[1]


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    m = _OVERLAP_MARGIN
    apart_x = a[0] + a[2] + m <= b[0] or b[0] + b[2] + m <= a[0]
    apart_y = a[1] + a[3] + m <= b[1] or b[1] + b[3] + m <= a[1]
    return not (apart_x or apart_y)


def _place_object(
    rng: np.random.Generator, width: int, height: int, background: str,
    placed: list[SceneObject], options: SceneOptions,
) -> SceneObject | None:
    kind = str(rng.choice(KINDS))
    colour = str(rng.choice([c for c in COLOURS if c != background]))
    size_names = list(SIZES)
    start = int(rng.integers(len(size_names)))
    # Crowded images fall back to smaller sizes before giving up on the object.
    for size in reversed(size_names[: start + 1]):
        extent = max(4, round(SIZES[size] * min(width, height)))
        for _ in range(_PLACEMENT_TRIES):
            centre = _sample_centre(rng, width, height, extent, int(rng.integers(9)))
            if centre is None:
                continue
            bbox = (centre[0] - extent // 2, centre[1] - extent // 2, extent, extent)
            if not options.allow_overlap and any(_overlaps(bbox, o.bbox) for o in placed):
                continue
            return SceneObject(kind, colour, size, centre, extent, bbox, position_of(*centre, width, height))
    return None


def sample_scene(rng: np.random.Generator, options: SceneOptions | None = None) -> Scene:
    """Draw a scene; identical generator state gives an identical scene."""
    options = options or SceneOptions()
    width, height = options.image_sizes[int(rng.integers(len(options.image_sizes)))]
    background = str(rng.choice(list(COLOURS)))
    textured = rng.random() < options.textured_fraction
    texture = str(rng.choice(TEXTURES[1:])) if textured else "plain"
    texture_seed = int(rng.integers(2**31))
    for _ in range(_SCENE_TRIES):
        wanted = int(rng.integers(options.min_objects, options.max_objects + 1))
        objects: list[SceneObject] = []
        while len(objects) < wanted:
            obj = _place_object(rng, width, height, background, objects, options)
            if obj is None:
                break
            objects.append(obj)
        if len(objects) >= options.min_objects:
            return Scene(width, height, background, texture, tuple(objects), texture_seed)
    raise RuntimeError(f"cannot fit {options.min_objects} objects into {width}x{height}")


# --------------------------------------------------------------------------- rendering

def _tint(rgb: tuple[int, int, int]) -> np.ndarray:
    c = np.asarray(rgb, dtype=np.float64)
    # Low-contrast partner colour: lighter for dark backgrounds, darker for light ones.
    return c + 0.15 * (255 - c) if c.mean() < 128 else c * 0.85


def _background(scene: Scene) -> np.ndarray:
    h, w = scene.height, scene.width
    base = np.asarray(COLOURS[scene.background], dtype=np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    if scene.texture == "plain":
        t = np.zeros((h, w))
    elif scene.texture == "stripes":
        t = (((xx + yy) // 4) % 2).astype(np.float64)
    elif scene.texture == "checker":
        t = (((xx // 8) + (yy // 8)) % 2).astype(np.float64)
    elif scene.texture == "gradient":
        t = yy / max(1, h - 1)
    elif scene.texture == "noise":
        coarse = np.random.default_rng(scene.texture_seed).random((h // 8 + 1, w // 8 + 1))
        t = coarse[yy // 8, xx // 8]
    else:
        raise ValueError(f"unknown texture {scene.texture!r}")
    img = base * (1 - t[..., None]) + _tint(COLOURS[scene.background]) * t[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _shape_mask(obj: SceneObject, width: int, height: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, e, _ = obj.bbox
    x1, y1 = x0 + e - 1, y0 + e - 1
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (e - 1) / 2
    if obj.kind == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif obj.kind == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif obj.kind == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif obj.kind == "star":
        pts = [
            (cx + rad * math.sin(math.pi * i / 5), cy - rad * math.cos(math.pi * i / 5))
            for i, rad in ((i, r if i % 2 == 0 else 0.45 * r) for i in range(10))
        ]
        draw.polygon(pts, fill=255)
    elif obj.kind == "ring":
        t = max(2, round(0.22 * e))  # ring thickness; >= 2 px so small rings survive JPEG
        draw.ellipse([x0, y0, x1, y1], fill=255)
        draw.ellipse([x0 + t, y0 + t, x1 - t, y1 - t], fill=0)
    else:
        raise ValueError(f"unknown kind {obj.kind!r}")
    return np.asarray(canvas) > 0


def render_masks(scene: Scene) -> list[np.ndarray]:
    """Visible pixels of each object (bool HxW), later objects occluding earlier ones."""
    full = [_shape_mask(o, scene.width, scene.height) for o in scene.objects]
    covered = np.zeros((scene.height, scene.width), dtype=bool)
    visible: list[np.ndarray] = [covered] * len(full)
    for i in range(len(full) - 1, -1, -1):
        visible[i] = full[i] & ~covered
        covered = covered | full[i]
    return visible


def render(scene: Scene) -> Image.Image:
    # Painting from the visible masks makes render() and render_masks() agree exactly.
    img = _background(scene)
    for obj, mask in zip(scene.objects, render_masks(scene)):
        img[mask] = COLOURS[obj.colour]
    return Image.fromarray(img, mode="RGB")


# --------------------------------------------------------------------------- dense captions

def reading_order(objects: Sequence[SceneObject]) -> list[SceneObject]:
    """Objects top-left to bottom-right (by 3x3 cell, then centre): the order captions list
    them in, so that a caption is a function of the image, not of how it was drawn."""
    return sorted(objects, key=lambda o: (POSITIONS.index(o.position), o.centre[1], o.centre[0]))


def describe(scene: Scene) -> str:
    """Dense ground-truth caption naming every object (in reading order) and the background."""
    phrases = [f"a {o.size} {o.colour} {o.kind} {POSITION_PHRASES[o.position]}" for o in reading_order(scene.objects)]
    ground = f"a {TEXTURE_ADJECTIVES[scene.texture]} {scene.background} background"
    if not phrases:
        text = f"{ground}."
    else:
        listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        text = f"{listed}, on {ground}."
    return text[0].upper() + text[1:]


def tokenize(text: str) -> list[str]:
    """Word-level tokens of a caption: lowercase words plus ',' and '.'."""
    return re.findall(r"[a-z]+|[,.]", text.lower())


def detokenize(tokens: list[str]) -> str:
    text = " ".join(tokens).replace(" ,", ",").replace(" .", ".")
    return text[:1].upper() + text[1:]


def vocabulary() -> list[str]:
    """Sorted set of tokens (see tokenize) that describe() can produce."""
    pieces = [
        *KINDS, *COLOURS, *SIZES, *POSITION_PHRASES.values(), *TEXTURE_ADJECTIVES.values(),
        "a and on background , .",
    ]
    return sorted({tok for piece in pieces for tok in tokenize(piece)})


@dataclass(frozen=True)
class ParsedCaption:
    objects: list[tuple[str, str, str, str]] = field(default_factory=list)  # (size, colour, kind, position)
    texture: str | None = None
    background: str | None = None


def _alternation(words: Any) -> str:
    # Longest first so "top left" wins over "top".
    return "|".join(sorted(map(re.escape, words), key=len, reverse=True))


def parse_description(text: str) -> ParsedCaption:
    """Inverse of describe(): recover the facts a (possibly generated) caption states."""
    alt = _alternation
    phrase_to_pos = {v: k for k, v in POSITION_PHRASES.items()}
    obj_re = re.compile(
        rf"\b({alt(SIZES)}) ({alt(COLOURS)}) ({alt(KINDS)}) ({alt(phrase_to_pos)})\b"
    )
    low = text.lower()
    objects = [(s, c, k, phrase_to_pos[p]) for s, c, k, p in obj_re.findall(low)]
    adj_to_texture = {v: k for k, v in TEXTURE_ADJECTIVES.items()}
    bg = re.search(rf"\b({alt(adj_to_texture)}) ({alt(COLOURS)}) background\b", low)
    if bg is None:
        return ParsedCaption(objects)
    return ParsedCaption(objects, adj_to_texture[bg.group(1)], bg.group(2))


# --------------------------------------------------------------------------- LAION-like alt text

ALT_TEXT_LABELS: tuple[str, ...] = ("true", "wrong", "noise", "empty")
_ALT_TEXT_PROBS = (0.5, 0.1, 0.3, 0.1)

_TRUE_TEMPLATES = (
    "{c} {k}", "{k}", "{c} {k} vector illustration - stock image", "{k} icon", "{C} {k} png transparent",
    "{c} {k} on {bg} background", "abstract {bg} background", "{k}s pattern", "simple {k} shape clipart",
    "{C} {K} Wall Art Print", "{c} {k} logo design template",
)
# Every wrong template names both colour and kind, so the swapped one is always stated.
_WRONG_TEMPLATES = (
    "{c} {k}", "{c} {k} vector illustration - stock image", "{C} {k} png transparent", "{C} {K} Wall Art Print",
)
_NOISE_TEMPLATES = (
    "Shapes wallpaper HD", "IMG_{n}.JPG", "DSC{n5}", "Buy geometric poster | Free shipping",
    "Abstract Geometric Art Print", "untitled-{n}", "Home Decor Ideas", "image",
    "Geometric background - Download Free Vectors", "Modern minimalist design, 2019", "photo by user{n}",
    "Kids room decoration | Sale -30%", "Pattern #{n}",
)


def labelled_alt_text(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """LAION-like alt text and its label in ALT_TEXT_LABELS (true / wrong / noise / empty)."""
    label = str(rng.choice(ALT_TEXT_LABELS, p=_ALT_TEXT_PROBS))
    n = int(rng.integers(1, 10000))
    if label == "empty":
        return "", "empty"
    if label == "noise" or not scene.objects:
        return _fill(rng, _NOISE_TEMPLATES, n=n), "noise"
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    colour, kind = obj.colour, obj.kind
    if label == "wrong":
        present = {o.colour for o in scene.objects} | {scene.background}
        wrong_colours = [c for c in COLOURS if c not in present]
        if rng.random() < 0.5 and wrong_colours:
            colour = str(rng.choice(wrong_colours))
        else:
            kind = str(rng.choice([k for k in KINDS if k not in {o.kind for o in scene.objects}] or KINDS))
        return _fill(rng, _WRONG_TEMPLATES, c=colour, k=kind), "wrong"
    return _fill(rng, _TRUE_TEMPLATES, c=colour, k=kind, bg=scene.background), "true"


def _fill(rng: np.random.Generator, templates: tuple[str, ...], **kw: Any) -> str:
    template = templates[int(rng.integers(len(templates)))]
    c, k = kw.get("c", ""), kw.get("k", "")
    n = kw.get("n", 0)
    return template.format(c=c, k=k, C=c.capitalize(), K=k.capitalize(), bg=kw.get("bg", ""), n=n, n5=f"{n:05d}")


def alt_text(scene: Scene, rng: np.random.Generator) -> str:
    return labelled_alt_text(scene, rng)[0]


def corpus(count: int, seed: int = 0) -> list[str]:
    """`count` scenes' dense descriptions and alt texts: the domain's language, for tokenizers
    and text encoders made here. The same arguments give the same sentences."""
    rng = np.random.default_rng([seed, 7919])
    lines = []
    for _ in range(count):
        scene = sample_scene(rng)
        lines += [describe(scene), alt_text(scene, rng)]
    return lines
