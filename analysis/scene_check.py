"""An exact checker for the synthetic domain: read a flat-colour scene back out of an image.

``read_image`` finds the background colour and the objects of an RGB image drawn from
synthetic/scenes.py's grammar (or a model's attempt at one) and says, for each
object, its colour, kind, size and 3x3 position. ``judge`` compares a reading with the scene
a prompt described, fact by fact. ``validate`` measures the checker on renders whose truth is
known, crisp or JPEG-compressed, so that scores computed with it can be trusted.

How an image is read:
1. every pixel is quantised to the nearest palette colour (textured backgrounds mix the
   background with a tint 15% of the way to white or black, which always stays nearest to
   the background colour itself);
2. the background is the most common colour on the image's border;
3. objects are connected regions of non-background pixels; a region holding a second colour
   with many pixels far (> 3 px) from the first (two objects merged by JPEG ringing or blur)
   is split between them, and regions smaller than a quarter of the smallest object the
   grammar draws are specks;
4. colour: the nearest palette colour of the median of the object's interior pixels;
   kind and extent: the best intersection-over-union with each kind's own mask (rendered by
   scenes.render_masks at candidate extents, aligned on the bounding box), which weighs the
   fill ratio, the hole of a ring and the top-heavy mass of a triangle at once ("unknown"
   when no kind fits); the usual shape features are recorded as well, to explain a reading;
   size: nearest of SIZES by extent; position: the implied square's centre, scenes.position_of.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage  # scipy comes with img2dataset (via albumentations)
from scipy.optimize import linear_sum_assignment
from scipy.spatial import ConvexHull, QhullError

from synthetic.scenes import (
    COLOURS, KINDS, POSITIONS, SIZES, Scene, SceneObject, SceneOptions, position_of, reading_order,
    render, render_masks, sample_scene,
)

log = logging.getLogger(__name__)

PALETTE_NAMES: tuple[str, ...] = tuple(COLOURS)
_PALETTE = np.asarray([COLOURS[c] for c in PALETTE_NAMES], dtype=np.float32)
_BORDER = 2  # px of frame the background is read from
_SPECK_FRACTION = 0.25  # of the smallest object's area: smaller regions are noise
_EIGHT = np.ones((3, 3), dtype=bool)
# Below this best template IoU a region is no shape of the grammar (kind "unknown"): renders,
# even JPEG'd at q=75 or blurred with sigma 1.3 px, score >= 0.69 in 99% of objects, while the
# blotches of an untrained model score 0.2-0.4 and would otherwise get a kind by chance.
MIN_SHAPE_IOU = 0.5
UNKNOWN = "unknown"

CATEGORIES: tuple[str, ...] = ("background", "colour", "kind", "binding", "position", "size", "count", "spatial")


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    kind: str  # one of KINDS, or UNKNOWN when no kind's mask fits
    size: str
    position: str
    centre: tuple[float, float]  # of the implied bounding square, as SceneObject.centre
    extent: int  # side of the implied bounding square, px
    bbox: tuple[int, int, int, int]  # tight x, y, w, h of the detected pixels
    area: int
    iou: dict[str, float] = field(default_factory=dict)  # best template IoU per kind
    features: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Reading:
    width: int
    height: int
    background: str
    objects: tuple[DetectedObject, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def as_scene(self) -> Scene:
        """The reading as a plain-background Scene, e.g. for scenes.describe()."""
        objects = []
        for o in self.objects:
            cx, cy = round(o.centre[0]), round(o.centre[1])
            bbox = (cx - o.extent // 2, cy - o.extent // 2, o.extent, o.extent)
            objects.append(SceneObject(o.kind, o.colour, o.size, (cx, cy), o.extent, bbox, o.position))
        return Scene(self.width, self.height, self.background, "plain", tuple(objects))


# --------------------------------------------------------------------------- reading

def quantise(rgb: np.ndarray) -> np.ndarray:
    """Index into PALETTE_NAMES of each pixel's nearest palette colour (HxW int)."""
    d = ((rgb[:, :, None, :].astype(np.float32) - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def min_area(width: int, height: int) -> int:
    """Speck threshold: a quarter of the smallest object the grammar draws at this size
    (a small star, 1.32 r² px), so a small star survives with a damaged edge but blobs of
    JPEG or diffusion noise don't count as objects."""
    e = max(4, round(SIZES["small"] * min(width, height)))
    r = (e - 1) / 2
    return max(4, int(_SPECK_FRACTION * 1.3225 * r * r))


@lru_cache(maxsize=4096)
def _template(kind: str, extent: int) -> tuple[np.ndarray, int, int]:
    """Kind's mask at `extent`, cropped to its pixels, and the crop's offset in its square."""
    obj = SceneObject(kind, "red", "small", (extent // 2, extent // 2), extent, (0, 0, extent, extent), "center")
    mask = render_masks(Scene(extent, extent, "white", "plain", (obj,)))[0]
    ys, xs = np.nonzero(mask)
    return mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1], int(xs.min()), int(ys.min())


def _iou(det: np.ndarray, tpl: np.ndarray) -> tuple[float, int, int]:
    """IoU of two crops aligned on their centres, and where tpl's corner lands in det's frame."""
    h, w = max(det.shape[0], tpl.shape[0]), max(det.shape[1], tpl.shape[1])
    a = np.zeros((h, w), dtype=bool)
    b = np.zeros((h, w), dtype=bool)
    ay, ax = (h - det.shape[0]) // 2, (w - det.shape[1]) // 2
    by, bx = (h - tpl.shape[0]) // 2, (w - tpl.shape[1]) // 2
    a[ay: ay + det.shape[0], ax: ax + det.shape[1]] = det
    b[by: by + tpl.shape[0], bx: bx + tpl.shape[1]] = tpl
    union = np.count_nonzero(a | b)
    return (np.count_nonzero(a & b) / union if union else 0.0), bx - ax, by - ay


def _match_kind(crop: np.ndarray) -> tuple[str, int, float, float, dict[str, float]]:
    """Best (kind, extent, centre x, centre y in crop coordinates) over templates."""
    longest = max(crop.shape)
    best: dict[str, tuple[float, int, float, float]] = {}
    # A star's pixels span ~0.95 x 0.9 of its square; JPEG rims and blur add a pixel or two.
    low = max(5, longest - 2)  # a ring needs 5 px
    for kind in KINDS:
        # at least one extent: a speck of 1-2 px (kept at small image sizes) still gets a reading
        for extent in range(low, max(int(longest / 0.9) + 3, low + 1)):
            tpl, ox, oy = _template(kind, extent)
            score, dx, dy = _iou(crop, tpl)
            if kind not in best or score > best[kind][0]:
                best[kind] = (score, extent, dx - ox + extent // 2, dy - oy + extent // 2)
    kind = max(KINDS, key=lambda k: best[k][0])
    score, extent, cx, cy = best[kind]
    if score < MIN_SHAPE_IOU:
        kind = UNKNOWN
    return kind, extent, cx, cy, {k: round(float(v[0]), 3) for k, v in best.items()}


def _features(crop: np.ndarray) -> dict[str, float]:
    """Classic shape features of an object's pixels (diagnostics for a reading)."""
    filled = ndimage.binary_fill_holes(crop)
    h, w = crop.shape
    ys, xs = np.nonzero(crop)
    try:  # pixel corners, so that a 1-px line still has an area
        pts = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
        hull = ConvexHull(pts).volume
    except QhullError:
        hull = float(len(xs))
    cy, cx, r = (h - 1) / 2, (w - 1) / 2, max(1.0, 0.15 * max(h, w))
    yy, xx = np.mgrid[0:h, 0:w]
    centre = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return {
        "fill_ratio": round(float(filled.sum()) / (h * w), 3),
        "solidity": round(float(filled.sum()) / hull, 3) if hull else 0.0,
        "mass_y": round(float(ys.mean()) / max(1, h - 1), 3),  # 0 top .. 1 bottom; triangles ~0.67
        "centre_hole": round(float((~crop[centre]).mean()), 3),  # rings ~1
    }


def _split(component: np.ndarray, q: np.ndarray, speck: int) -> list[np.ndarray]:
    """Masks of the objects in one connected non-background region: its commonest colour,
    plus any other colour with at least a speck's worth of pixels more than 3 px from the
    colours already taken (two objects merged by JPEG ringing or blur). The rims of blended
    colours that JPEG and blur leave along edges, and the spikes of a small star that chroma
    subsampling tints, all lie within 3 px of their object, so they never count on their own."""
    colours, counts = np.unique(q[component], return_counts=True)
    order = np.argsort(-counts)
    majors = [int(colours[order[0]])]
    for i in order[1:]:
        if counts[i] < speck:
            break
        c = int(colours[i])
        taken = np.isin(q, majors) & component
        far = ndimage.distance_transform_edt(~taken) > 3
        if np.count_nonzero(far & component & (q == c)) >= speck:
            majors.append(c)
    if len(majors) == 1:
        return [component]
    seeds = np.zeros(q.shape, dtype=np.int32)
    for n, c in enumerate(majors, 1):
        own = component & (q == c)
        core = ndimage.binary_erosion(own, _EIGHT)
        # Seeds are solid cores: a thin rim of one object's colour around another
        # (blended edges quantise that way) must go to the object it surrounds.
        seeds[core if core.any() else own] = n
    # Every pixel of the region goes to the object of the nearest seed.
    _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    owner = seeds[iy, ix]
    return [component & (owner == n) for n in range(1, len(majors) + 1)]


def read_image(image: Image.Image) -> Reading:
    """What a checker sees in `image`: background colour and objects (largest first)."""
    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    q = quantise(rgb)
    b = _BORDER
    border = np.concatenate([q[:b].ravel(), q[-b:].ravel(), q[:, :b].ravel(), q[:, -b:].ravel()])
    background = int(np.bincount(border, minlength=len(PALETTE_NAMES)).argmax())
    speck = min_area(width, height)
    labels, n = ndimage.label(q != background, structure=_EIGHT)
    objects = []
    for i in range(1, n + 1):
        region = labels == i
        if region.sum() < speck:
            continue
        for mask in _split(region, q, speck):
            if mask.sum() >= speck:
                objects.append(_describe(mask, rgb, background, width, height))
    objects.sort(key=lambda o: -o.area)
    return Reading(width, height, PALETTE_NAMES[background], tuple(objects))


def _describe(mask: np.ndarray, rgb: np.ndarray, background: int, width: int, height: int) -> DetectedObject:
    interior = ndimage.binary_erosion(mask, _EIGHT)
    pixels = rgb[interior] if interior.sum() >= 4 else rgb[mask]  # edges carry blended colours
    index = int(quantise(np.median(pixels, axis=0)[None, None])[0, 0])
    colour = PALETTE_NAMES[index]
    if index != background:
        # Edge pixels blend object and background: the object's shape is where the blend is
        # nearer the object's colour (a 50% threshold), which gives a JPEG'd or blurred
        # ring its hole back and a small star its points.
        d_obj = ((rgb - _PALETTE[index]) ** 2).sum(-1)
        d_bg = ((rgb - _PALETTE[background]) ** 2).sum(-1)
        shape = mask & (d_obj < d_bg)
        mask = shape if shape.sum() >= 4 else mask
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    crop = mask[y0: y1 + 1, x0: x1 + 1]
    kind, extent, cx, cy, ious = _match_kind(crop)
    cx, cy = x0 + cx, y0 + cy
    sizes = list(SIZES)
    size = min(sizes, key=lambda s: abs(SIZES[s] * min(width, height) - extent))
    return DetectedObject(
        colour=colour, kind=kind, size=size, position=position_of(cx, cy, width, height),
        centre=(float(cx), float(cy)), extent=int(extent), bbox=(x0, y0, x1 - x0 + 1, y1 - y0 + 1),
        area=int(mask.sum()), iou=ious, features=_features(crop),
    )


# --------------------------------------------------------------------------- judging

def _cost(e: SceneObject, d: DetectedObject, diagonal: float) -> float:
    # Identity (colour, kind) first, then where and how big; distance only breaks ties.
    distance = np.hypot(e.centre[0] - d.centre[0], e.centre[1] - d.centre[1]) / diagonal
    return ((e.colour != d.colour) + (e.kind != d.kind) + 0.5 * (e.position != d.position)
            + 0.25 * (e.size != d.size) + 0.01 * distance)


def match(expected: Scene, reading: Reading) -> list[DetectedObject | None]:
    """One-to-one assignment (Hungarian, least total cost) of the expected objects, in
    reading order, to detected ones; None where there are fewer detections than objects.

    Only the n + 1 largest detections are candidates for n expected objects: an image of a
    dozen blotches (an untrained model's) would otherwise hold a blotch of the asked colour
    or kind somewhere by chance. The slack of one lets a stray blotch bigger than the object
    cost the count, not the attributes."""
    wanted = reading_order(expected.objects)
    found: list[DetectedObject | None] = [None] * len(wanted)
    candidates = sorted(reading.objects, key=lambda d: -d.area)[: len(wanted) + 1]
    if wanted and candidates:
        diagonal = float(np.hypot(expected.width, expected.height))
        cost = np.array([[_cost(e, d, diagonal) for d in candidates] for e in wanted])
        for i, j in zip(*linear_sum_assignment(cost)):
            found[i] = candidates[j]
    return found


def relation_holds(a: SceneObject, b: SceneObject, da: DetectedObject, db: DetectedObject) -> bool:
    """Do the detections keep the left/right and above/below order the prompt's cells imply?
    An axis on which the two cells agree states no relation. The detections must also be
    the named objects (right colour or kind), else the relation is about something else."""
    if not ((da.colour == a.colour or da.kind == a.kind) and (db.colour == b.colour or db.kind == b.kind)):
        return False
    (ra, ca), (rb, cb) = divmod(POSITIONS.index(a.position), 3), divmod(POSITIONS.index(b.position), 3)
    ok = True
    if ca != cb:
        ok &= (ca < cb) == (da.centre[0] < db.centre[0])
    if ra != rb:
        ok &= (ra < rb) == (da.centre[1] < db.centre[1])
    return bool(ok)


def judge(expected: Scene, reading: Reading) -> dict[str, bool]:
    """Verdict per fact: 'background', 'count', 'object{i}.{colour,kind,binding,position,size}'
    for each expected object i in reading (prompt) order, and 'spatial' when the prompt names
    exactly two objects in different cells."""
    verdicts = {"background": reading.background == expected.background,
                "count": len(reading.objects) == len(expected.objects)}
    wanted = reading_order(expected.objects)
    found = match(expected, reading)
    for i, (e, d) in enumerate(zip(wanted, found)):
        colour = d is not None and d.colour == e.colour
        kind = d is not None and d.kind == e.kind
        verdicts.update({f"object{i}.colour": colour, f"object{i}.kind": kind,
                         f"object{i}.binding": colour and kind,
                         f"object{i}.position": d is not None and d.position == e.position,
                         f"object{i}.size": d is not None and d.size == e.size})
    if len(wanted) == 2 and wanted[0].position != wanted[1].position:
        a, b = wanted
        verdicts["spatial"] = None not in found and relation_holds(a, b, found[0], found[1])
    return verdicts


def category_of(key: str) -> str:
    """'object1.colour' -> 'colour'; 'count' -> 'count'."""
    return key.rsplit(".", 1)[-1]


# --------------------------------------------------------------------------- validation

def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)  # PIL's default 4:2:0 chroma subsampling
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def degrade(image: Image.Image, blur: float, noise: float, seed: int) -> Image.Image:
    """A stand-in for a small diffusion model's output: Gaussian blur and pixel noise."""
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    if noise > 0:
        arr = np.asarray(image, dtype=np.float32)
        arr = arr + np.random.default_rng(seed).normal(0, noise, arr.shape)
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return image


@dataclass(frozen=True)
class Validation:
    accuracy: dict[str, float]  # per category of CATEGORIES
    n: dict[str, int]  # facts checked per category
    images: int
    kind_by_shape: dict[str, float]  # kind accuracy per "kind/size" of the drawn object
    failures: list[dict[str, Any]]  # the first few wrong readings, to look at


def validate(count: int, seed: int = 0, resolution: int = 64, jpeg_quality: int | None = None,
             options: SceneOptions | None = None, blur: float = 0.0, noise: float = 0.0) -> Validation:
    """Checker accuracy on `count` renders of sampled scenes (default: square `resolution`
    px, 1-3 objects, 30% textured), optionally blurred and noised, then JPEG-compressed."""
    options = options or SceneOptions(image_sizes=((resolution, resolution),))
    hits: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
    by_shape: dict[str, list[bool]] = {f"{k}/{s}": [] for k in KINDS for s in SIZES}
    failures = []
    for i in range(count):
        scene = sample_scene(np.random.default_rng([seed, i, 0x5C4E]), options)
        image = degrade(render(scene), blur, noise, seed=i)
        if jpeg_quality is not None:
            image = jpeg(image, jpeg_quality)
        reading = read_image(image)
        verdicts = judge(scene, reading)
        for key, ok in verdicts.items():
            hits[category_of(key)].append(ok)
        for j, obj in enumerate(reading_order(scene.objects)):
            by_shape[f"{obj.kind}/{obj.size}"].append(verdicts[f"object{j}.kind"])
        if not all(verdicts.values()) and len(failures) < 20:
            failures.append({"index": i, "scene": scene.to_dict(), "reading": reading.to_dict(),
                             "wrong": [k for k, ok in verdicts.items() if not ok]})
    mean = {c: float(np.mean(v)) if v else float("nan") for c, v in hits.items()}
    shapes = {k: float(np.mean(v)) for k, v in by_shape.items() if v}
    return Validation(mean, {c: len(v) for c, v in hits.items()}, count, shapes, failures)
