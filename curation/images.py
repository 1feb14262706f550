"""The project's image decoding policy: one place that turns untrusted bytes from any source
(LAION URLs, SA-1B tars, local folders) into upright RGB JPEGs plus the hashes used to
deduplicate them. It is also handed to img2dataset's Downloader as its `resizer`.

Decisions worth knowing before changing anything here:

* Bounded decoding. The pixel count is read from the header (`Image.open` is lazy) and
  checked before `load()`, so a decompression bomb never allocates. PIL's own bomb guard
  runs inside `Image.open`, before our check can: its error and its warning (turned into an
  error here) are reported as the same "too_many_pixels" rejection. PIL's bound
  (`Image.MAX_IMAGE_PIXELS`, ~89.5 MP) therefore still applies on top of `max_pixels`;
  raising `max_pixels` past it needs raising PIL's too. `LOAD_TRUNCATED_IMAGES` is never
  touched: a truncated file is a rejection, not a grey-padded sample.
* Exact hash on the full decode. `pixel_sha256` is computed on the full-resolution
  upright RGB pixels, so JPEG draft mode (DCT-domain downscaling while decoding) is not
  used: draft pixels depend on the target size and on the decoder's scaling, so the same
  picture would hash differently under two policies (256 vs 512) or as JPEG-with-draft
  versus PNG, which defeats exact dedup across sources. Measured cost on a 2250x1500
  SA-1B-sized JPEG: ~14 ms full decode vs ~8 ms with draft, plus a larger resize input;
  `reducing_gap` in the resize recovers most of the resize part.
* pHash excludes the DC term from the median (see `phash`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import dataclass
from typing import BinaryIO, Callable, Optional

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

RESIZE_MODES = ("keep_ratio", "center_crop", "none")
# Raster formats we expect from the web and from datasets. Everything else (EPS, which
# shells out to Ghostscript, and PIL's long tail of legacy plugins) is attack surface for
# no data.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
RESAMPLE = Image.Resampling.LANCZOS
# 2.0 halves the cost of an SA-1B-sized downscale against 3.0 (the "indistinguishable"
# setting); the difference is invisible at training resolutions.
REDUCING_GAP = 2.0
WHITE = (255, 255, 255)
# Rows are hashed in bands of about this many pixels so that a huge image does not need a
# second full-size copy just to be hashed.
HASH_BAND_PIXELS = 4_000_000

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_PASSTHROUGH_MODES = frozenset({"RGB", "L"})
_ROTATING_ORIENTATIONS = frozenset(range(2, 9))


class ImageRejected(Exception):
    """An input that will not become a sample. `reason` is short and machine-readable:
    empty, not_an_image, too_many_pixels, decode_error, unsupported_mode, encode_error;
    `detail` is for humans."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # noqa: ANN204
        # Exceptions cross process boundaries (Ray, multiprocessing); the default pickling
        # would rebuild from the formatted message and lose the reason/detail split.
        return (type(self), (self.reason, self.detail))


@dataclass(frozen=True)
class ProcessedImage:
    data: bytes  # a JPEG, or the original bytes untouched when nothing had to change
    width: int  # of `data`
    height: int
    original_width: int  # upright (after EXIF orientation), before resize
    original_height: int
    pixel_sha256: str  # full-resolution upright RGB pixels, shape mixed in
    phash: int  # 64-bit DCT perceptual hash
    reencoded: bool


@dataclass(frozen=True)
class _Decoded:
    """The upright RGB image plus what the pass-through decision needs to know about the
    file it came from."""

    rgb: Image.Image
    format: Optional[str]
    mode: str
    progressive: bool
    orientation: int
    icc_profile: Optional[bytes]


@dataclass(frozen=True)
class ResizePlan:
    size: tuple[int, int]
    box: tuple[int, int, int, int]  # region of the source that becomes the output


@dataclass(frozen=True)
class ImagePolicy:
    mode: str = "keep_ratio"  # "keep_ratio" | "center_crop" | "none"
    size: int = 256
    upscale: bool = False
    quality: int = 95
    max_pixels: int = 100_000_000

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"mode must be one of {RESIZE_MODES}, got {self.mode!r}")
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")

    def process(self, data: bytes) -> ProcessedImage:
        """Decode, normalise, hash, resize and encode one image; raises ImageRejected."""
        decoded = self._decode(data)
        rgb = decoded.rgb
        plan = self.plan(*rgb.size)
        reencoded = plan is not None or not _can_pass_through(decoded)
        out = _apply(rgb, plan) if plan is not None else rgb
        return ProcessedImage(
            data=_encode_jpeg(out, self.quality, decoded.icc_profile) if reencoded else bytes(data),
            width=out.width,
            height=out.height,
            original_width=rgb.width,
            original_height=rgb.height,
            # hashed on the stored pixels, not the full-size decode: identical originals give
            # identical stored pixels, and on SA-1B-sized images (2250x1500) hashing the
            # original cost ~14 ms an image, as much as decoding it (bench: sam_ingestion)
            pixel_sha256=pixel_sha256(out),
            phash=phash(out),
            reencoded=reencoded,
        )

    def plan(self, width: int, height: int) -> Optional[ResizePlan]:
        """What to do to an upright width x height image; None when it is left as is.

        keep_ratio follows img2dataset (smaller side becomes `size`). center_crop always
        yields a square: img2dataset leaves an image whose smaller side is <= size untouched
        (no crop either), which would let 200x300 or 256x400 into a dataset that promises
        squares; here such an image is centre-cropped to its smaller side, never enlarged
        unless `upscale`."""
        if self.mode == "none":
            return None
        short = min(width, height)
        if self.mode == "keep_ratio":
            if short == self.size or (short < self.size and not self.upscale):
                return None
            scale = self.size / short
            new = (max(1, round(width * scale)), max(1, round(height * scale)))
            return ResizePlan(size=new, box=(0, 0, width, height))
        side = self.size if short >= self.size or self.upscale else short
        if width == height == side:
            return None
        left, top = (width - short) // 2, (height - short) // 2
        return ResizePlan(size=(side, side), box=(left, top, left + short, top + short))

    def as_img2dataset_resizer(self) -> Callable:
        return Img2DatasetResizer(self)

    def _decode(self, data: bytes) -> _Decoded:
        if not data:
            raise ImageRejected("empty")
        with warnings.catch_warnings():
            # Not thread-safe before Python 3.14 (one global filter list): a race can drop
            # this filter or leave it installed; either way the size check below, which
            # uses the same bound, still rejects before load().
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _open(data)
            self._check_pixels(img)
            _load(img)
        orientation = _orientation(img)
        upright = _exif_transpose(img) if orientation in _ROTATING_ORIENTATIONS else img
        return _Decoded(
            rgb=to_rgb(upright),
            format=img.format,
            mode=img.mode,
            progressive=bool(img.info.get("progressive") or img.info.get("progression")),
            orientation=orientation,
            icc_profile=img.info.get("icc_profile"),
        )

    def _check_pixels(self, img: Image.Image) -> None:
        width, height = img.size
        limit = self.max_pixels
        if Image.MAX_IMAGE_PIXELS is not None:
            limit = min(limit, Image.MAX_IMAGE_PIXELS)
        if width * height > limit:
            raise ImageRejected("too_many_pixels", f"{width}x{height} > {limit} pixels")


def _accepted_formats() -> list[str]:
    # Image.open raises KeyError (not UnidentifiedImageError) for a format name with no
    # plugin, e.g. AVIF on a Pillow built without libavif.
    Image.init()
    return [name for name in ACCEPTED_FORMATS if name in Image.OPEN]


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=_accepted_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("too_many_pixels", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected("not_an_image", str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - a corrupt header may raise anything
        raise ImageRejected("decode_error", f"{type(exc).__name__}: {exc}") from exc


def _load(img: Image.Image) -> None:
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("too_many_pixels", str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - corrupt data may raise anything
        raise ImageRejected("decode_error", f"{type(exc).__name__}: {exc}") from exc


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as exc:  # noqa: BLE001 - broken EXIF should not cost us the pixels
        log.debug("unreadable EXIF, assuming upright: %s", exc)
        return 1
    return value if isinstance(value, int) else 1


def _exif_transpose(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001
        raise ImageRejected("decode_error", f"exif_transpose: {exc}") from exc


def _can_pass_through(decoded: _Decoded) -> bool:
    """Original bytes are kept only when re-encoding could change nothing a reader sees:
    a baseline RGB/greyscale JPEG that is already upright. Progressive files are
    re-encoded because some GPU/streaming JPEG decoders handle them badly or slowly."""
    return (
        decoded.format == "JPEG"
        and decoded.mode in _PASSTHROUGH_MODES
        and not decoded.progressive
        and decoded.orientation not in _ROTATING_ORIENTATIONS
    )


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited onto white (as img2dataset
    does), wide greyscale is scaled to 8 bits rather than clipped."""
    mode = img.mode
    if mode in _WIDE_GREY_MODES:
        return _wide_grey_to_l(img).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        return _on_white(img.convert("RGBA"))
    if mode == "RGB":
        return img
    try:
        # CMYK: PIL already undoes Adobe's inverted CMYK (and libjpeg turns YCCK into
        # CMYK), so the plain conversion is right; embedded CMYK profiles are ignored.
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageRejected("unsupported_mode", f"{mode}: {exc}") from exc


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, WHITE)
    background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return background


def _wide_grey_to_l(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale to 8 bits by the range the type implies, not PIL's
    clipping convert (which turns almost every 16-bit pixel white).

    I;16 is 0..65535. Mode I is what older Pillows and some TIFFs give for 16-bit data, so
    non-negative values that fit 16 bits are read as 16-bit; anything else is stretched
    min..max. F in 0..1 is read as normalised; otherwise stretched."""
    values = np.asarray(img).astype(np.float32)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
    elif img.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _apply(img: Image.Image, plan: ResizePlan) -> Image.Image:
    box_w, box_h = plan.box[2] - plan.box[0], plan.box[3] - plan.box[1]
    if (box_w, box_h) == plan.size:
        return img.crop(plan.box)
    # Resizing straight from the crop box avoids scaling pixels that are then cut away
    # and the rounding of an intermediate size.
    return img.resize(plan.size, RESAMPLE, box=plan.box, reducing_gap=REDUCING_GAP)


def _encode_jpeg(img: Image.Image, quality: int, icc_profile: Optional[bytes]) -> bytes:
    options: dict = {"quality": quality}
    # Keep a wide-gamut RGB profile (Adobe RGB, Display P3) or colours shift; a CMYK or
    # grey profile describes the source, not these RGB pixels, so it is dropped.
    if icc_profile and icc_profile[16:20] == b"RGB ":
        options["icc_profile"] = icc_profile
    buffer = io.BytesIO()
    try:
        img.save(buffer, format="JPEG", **options)
    except (OSError, ValueError) as exc:  # e.g. a side over JPEG's 65500-pixel limit
        raise ImageRejected("encode_error", f"{type(exc).__name__}: {exc}") from exc
    return buffer.getvalue()


def pixel_sha256(rgb: Image.Image) -> str:
    """sha256 of the RGB pixels in row order, prefixed with the shape so that the same
    bytes laid out as 2x6 and 3x4 differ."""
    if rgb.mode != "RGB":
        rgb = to_rgb(rgb)
    width, height = rgb.size
    digest = hashlib.sha256(f"RGB {width}x{height}\n".encode())
    band = max(1, HASH_BAND_PIXELS // max(1, width))
    for top in range(0, height, band):
        digest.update(rgb.crop((0, top, width, min(height, top + band))).tobytes())
    return digest.hexdigest()


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II: row k is alpha(k) * cos(pi * (2i + 1) * k / 2n)."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    matrix[0, :] = np.sqrt(1.0 / n)
    return matrix


_PHASH_SIZE = 32
_PHASH_BLOCK = 8
_DCT = _dct_matrix(_PHASH_SIZE)


def phash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash (the imagehash/pHash recipe): 32x32 greyscale, 2-D DCT-II,
    top-left 8x8 low frequencies, each bit = coefficient > median, first coefficient in the
    most significant bit.

    The median is taken over the 63 AC terms only: the DC term is the mean brightness,
    orders of magnitude larger, and says nothing about structure. Its bit is still emitted
    (so the layout is the usual 8x8 = 64) but is effectively constant, so distances are
    over 63 informative bits."""
    rgb = image if image.mode == "RGB" else to_rgb(image)
    # Downscale before going grey: the 32x32 image is all that is needed, and converting
    # a full-size image first would cost a full-size pass. BOX (area average) is what a
    # 32x32 summary needs and costs ~40% less than LANCZOS here (bench: sam_ingestion).
    small = rgb.resize((_PHASH_SIZE, _PHASH_SIZE), Image.BOX).convert("L")
    pixels = np.asarray(small, dtype=np.float64)
    block = (_DCT @ pixels @ _DCT.T)[:_PHASH_BLOCK, :_PHASH_BLOCK].ravel()
    # A flat image's AC terms are float noise around 0 (~1e-13) and would give it random
    # bits; rounding makes every blank/placeholder image hash alike (all AC bits 0).
    block = np.round(block, 6)
    bits = block > np.median(block[1:])
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class EncodedImage(bytes):
    """The image bytes img2dataset writes, carrying the ProcessedImage they came from.

    img2dataset's resizer contract only passes bytes and sizes on to the writer; a custom
    writer downstream wants the hashes too, and decoding the JPEG again to recompute them
    would double the per-image cost (and give a different pixel hash after lossy
    re-encoding). Subclassing bytes keeps img2dataset's stock writers working unchanged."""

    processed: ProcessedImage

    def __new__(cls, processed: ProcessedImage) -> "EncodedImage":
        obj = super().__new__(cls, processed.data)
        obj.processed = processed
        return obj

    def __reduce__(self):  # noqa: ANN204
        return (type(self), (self.processed,))


_Img2DatasetResult = tuple[
    Optional[bytes], Optional[int], Optional[int], Optional[int], Optional[int], Optional[str]
]


def _failure(message: str) -> _Img2DatasetResult:
    return None, None, None, None, None, message


@dataclass(frozen=True)
class Img2DatasetResizer:
    """img2dataset's resizer signature over an ImagePolicy. A plain class, not a closure,
    because img2dataset pickles the Downloader (and its resizer) into worker processes."""

    policy: ImagePolicy

    def __call__(self, img_stream: BinaryIO, blurring_bbox_list=None) -> _Img2DatasetResult:  # noqa: ANN001
        if blurring_bbox_list is not None:
            # Dropping the boxes silently would publish faces meant to be blurred;
            # img2dataset itself fails such a sample when it has no blurrer.
            return _failure("blurring_unsupported: this resizer has no blurrer")
        try:
            img_stream.seek(0)
            processed = self.policy.process(img_stream.read())
        except ImageRejected as exc:
            return _failure(str(exc))
        except Exception as exc:  # noqa: BLE001 - an exception here would kill the whole shard
            log.exception("image policy failed unexpectedly")
            return _failure(f"internal_error: {type(exc).__name__}: {exc}")
        return (
            EncodedImage(processed),
            processed.width,
            processed.height,
            processed.original_width,
            processed.original_height,
            None,
        )
