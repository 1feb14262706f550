"""The image decoding policy: sizes, modes, orientation, bounds, hashes and the img2dataset
resizer contract. Every image is built in memory."""

from __future__ import annotations

import io
import itertools
import pickle
import resource
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from curation.images import (
    EncodedImage,
    ImagePolicy,
    ImageRejected,
    ProcessedImage,
    hamming,
    phash,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def encode(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def pixel(processed: ProcessedImage, xy: tuple[int, int]) -> tuple[int, ...]:
    return decode(processed.data).convert("RGB").getpixel(xy)


def close(actual, expected, tolerance: int = 6) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected))


def scene(seed: int, size: tuple[int, int] = (256, 256)) -> Image.Image:
    """A smooth-ish synthetic picture: gradient background and a few random shapes."""
    rng = np.random.default_rng(seed)
    w, h = size
    across = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, axis=0)
    down = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, axis=1)
    background = np.stack([across, down, 255 - across], axis=-1)
    img = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0 = rng.integers(0, w * 3 // 4), rng.integers(0, h * 3 // 4)
        x1, y1 = x0 + rng.integers(w // 8 + 1, w // 2 + 2), y0 + rng.integers(h // 8 + 1, h // 2 + 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=colour)
    return img.filter(ImageFilter.GaussianBlur(2))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries no pixel data: opening it is cheap,
    loading it would allocate width*height bytes before failing."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rejected(policy: ImagePolicy, data: bytes) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        policy.process(data)
    return info.value


# --- resize modes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "upscale", "source", "expected"),
    [
        ("keep_ratio", False, (800, 400), (512, 256)),
        ("keep_ratio", False, (300, 900), (256, 768)),
        ("keep_ratio", False, (100, 50), (100, 50)),
        ("keep_ratio", True, (100, 50), (512, 256)),
        ("center_crop", False, (800, 400), (256, 256)),
        ("center_crop", False, (300, 900), (256, 256)),
        ("center_crop", False, (100, 200), (100, 100)),
        ("center_crop", False, (256, 400), (256, 256)),
        ("center_crop", True, (100, 200), (256, 256)),
        ("none", False, (800, 400), (800, 400)),
    ],
)
def test_resize_mode_output_size(mode, upscale, source, expected):
    result = ImagePolicy(mode=mode, size=256, upscale=upscale).process(encode(scene(1, source)))
    assert (result.width, result.height) == expected
    assert decode(result.data).size == expected
    assert (result.original_width, result.original_height) == source


def test_center_crop_keeps_the_centre():
    img = Image.new("RGB", (600, 200), BLUE)
    ImageDraw.Draw(img).rectangle((0, 0, 199, 199), fill=RED)
    ImageDraw.Draw(img).rectangle((400, 0, 599, 199), fill=RED)
    result = ImagePolicy(mode="center_crop", size=100).process(encode(img))
    assert (result.width, result.height) == (100, 100)
    out = np.asarray(decode(result.data).convert("RGB")).reshape(-1, 3).astype(int)
    assert np.abs(out - BLUE).max() <= 10  # both red side panels are cut away


def test_keep_ratio_downscale_preserves_content():
    img = Image.new("RGB", (1000, 500), BLUE)
    ImageDraw.Draw(img).rectangle((500, 0, 999, 499), fill=RED)
    result = ImagePolicy(size=100).process(encode(img))
    assert close(pixel(result, (20, 50)), BLUE) and close(pixel(result, (180, 50)), RED)


# --- modes ----------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb():
    img = Image.new("CMYK", (64, 32), (0, 0, 0, 0))  # white
    ImageDraw.Draw(img).rectangle((32, 0, 63, 31), fill=(0, 255, 255, 0))  # red
    data = encode(img, "JPEG", quality=95)
    assert decode(data).mode == "CMYK"
    result = ImagePolicy(mode="none").process(data)
    assert result.reencoded and decode(result.data).mode == "RGB"
    assert close(pixel(result, (8, 16)), (255, 255, 255), 8)
    assert close(pixel(result, (56, 16)), RED, 12)


def test_palette_png_with_transparency_composites_on_white():
    img = Image.new("P", (40, 20), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black, index 1 blue
    ImageDraw.Draw(img).rectangle((20, 0, 39, 19), fill=1)
    data = encode(img, transparency=0)
    assert decode(data).mode == "P"
    result = ImagePolicy(mode="none").process(data)
    assert close(pixel(result, (5, 10)), (255, 255, 255))  # transparent black -> white
    assert close(pixel(result, (35, 10)), BLUE, 10)


def test_palette_png_without_transparency():
    img = Image.new("P", (20, 20), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    result = ImagePolicy(mode="none").process(encode(img))
    assert close(pixel(result, (10, 10)), RED, 10)


def test_rgba_is_composited_onto_white():
    img = Image.new("RGBA", (40, 20), (255, 0, 0, 255))
    ImageDraw.Draw(img).rectangle((20, 0, 39, 19), fill=(255, 0, 0, 0))
    ImageDraw.Draw(img).rectangle((0, 0, 9, 19), fill=(0, 0, 0, 128))
    result = ImagePolicy(mode="none").process(encode(img))
    assert close(pixel(result, (15, 10)), RED, 10)
    assert close(pixel(result, (35, 10)), (255, 255, 255))
    assert close(pixel(result, (4, 10)), (127, 127, 127))  # half-transparent black


def test_la_is_composited_onto_white():
    img = Image.new("LA", (40, 20), (0, 255))
    ImageDraw.Draw(img).rectangle((20, 0, 39, 19), fill=(0, 0))
    result = ImagePolicy(mode="none").process(encode(img))
    assert close(pixel(result, (5, 10)), (0, 0, 0))
    assert close(pixel(result, (35, 10)), (255, 255, 255))


def test_16_bit_greyscale_png_is_scaled_not_clipped():
    values = np.zeros((16, 48), dtype=np.uint16)
    values[:, 16:32] = 32768
    values[:, 32:] = 65535
    data = encode(Image.fromarray(values))
    assert decode(data).mode == "I;16"
    result = ImagePolicy(mode="none").process(data)
    assert close(pixel(result, (8, 8)), (0, 0, 0), 3)
    assert close(pixel(result, (24, 8)), (128, 128, 128), 3)
    assert close(pixel(result, (40, 8)), (255, 255, 255), 3)


def test_32_bit_modes_are_scaled():
    ints = Image.fromarray(np.full((8, 8), 32768, dtype=np.int32))
    floats = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32))
    assert (ints.mode, floats.mode) == ("I", "F")
    for img in (ints, floats):
        result = ImagePolicy(mode="none").process(encode(img, "TIFF"))
        assert close(pixel(result, (4, 4)), (128, 128, 128), 3)


def test_one_bit_image():
    img = Image.new("1", (32, 16), 0)
    ImageDraw.Draw(img).rectangle((16, 0, 31, 15), fill=1)
    result = ImagePolicy(mode="none").process(encode(img))
    assert decode(result.data).mode == "RGB"
    assert close(pixel(result, (4, 8)), (0, 0, 0)) and close(pixel(result, (28, 8)), (255, 255, 255))


def test_greyscale_jpeg_passes_through_but_hashes_as_rgb():
    grey = Image.new("L", (30, 20), 90)
    data = encode(grey, "JPEG", quality=95)
    result = ImagePolicy().process(data)
    assert result.data == data and not result.reencoded
    as_rgb = ImagePolicy().process(encode(decode(data).convert("RGB"), "PNG"))
    assert result.pixel_sha256 == as_rgb.pixel_sha256


# --- EXIF orientation -----------------------------------------------------------------


def oriented_jpeg(orientation: int) -> bytes:
    """A 60x30 landscape-coded image with a red block in the coded top-left corner."""
    img = Image.new("RGB", (60, 30), BLUE)
    ImageDraw.Draw(img).rectangle((0, 0, 15, 15), fill=RED)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_6_is_applied():
    # Orientation 6: display = coded rotated 90 degrees clockwise, so the coded top-left
    # corner ends up top-right and the landscape code displays as portrait.
    result = ImagePolicy(mode="none").process(oriented_jpeg(6))
    assert (result.width, result.height) == (30, 60)
    assert (result.original_width, result.original_height) == (30, 60)
    assert result.reencoded
    assert close(pixel(result, (25, 4)), RED, 20)  # top-right
    assert close(pixel(result, (4, 4)), BLUE, 20)  # top-left
    assert close(pixel(result, (25, 55)), BLUE, 20)
    assert 0x0112 not in decode(result.data).getexif()


def test_exif_orientation_with_resize():
    result = ImagePolicy(mode="keep_ratio", size=15).process(oriented_jpeg(6))
    assert (result.width, result.height) == (15, 30)
    assert (result.original_width, result.original_height) == (30, 60)
    assert close(pixel(result, (12, 2)), RED, 30)


def test_orientation_1_jpeg_still_passes_through():
    data = oriented_jpeg(1)
    result = ImagePolicy(mode="none").process(data)
    assert result.data == data and not result.reencoded


# --- bounds and bad input -------------------------------------------------------------


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def test_header_over_max_pixels_is_rejected_before_load():
    before = _max_rss_bytes()
    error = rejected(ImagePolicy(max_pixels=1_000_000), png_header_only(5000, 5000))
    assert error.reason == "too_many_pixels"
    assert _max_rss_bytes() - before < 100 * 2**20


def test_pil_decompression_bomb_error_is_a_rejection():
    before = _max_rss_bytes()
    error = rejected(ImagePolicy(max_pixels=10**12), png_header_only(30000, 30000))
    assert error.reason == "too_many_pixels"
    assert _max_rss_bytes() - before < 100 * 2**20


def test_pil_decompression_bomb_warning_is_a_rejection_and_filters_are_restored():
    filters = list(warnings.filters)
    error = rejected(ImagePolicy(max_pixels=10**12), png_header_only(10000, 10000))
    assert error.reason == "too_many_pixels"
    assert warnings.filters == filters


def test_real_image_over_max_pixels():
    data = encode(Image.new("L", (300, 300)), "PNG")
    assert rejected(ImagePolicy(max_pixels=300 * 299), data).reason == "too_many_pixels"
    assert ImagePolicy(max_pixels=300 * 300).process(data).original_width == 300


def test_truncated_jpeg_is_a_decode_error():
    data = encode(scene(3), "JPEG", quality=90)
    error = rejected(ImagePolicy(), data[: len(data) // 2])
    assert error.reason == "decode_error"


def test_corrupt_png_is_a_decode_error():
    data = bytearray(encode(scene(4), "PNG"))
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    assert rejected(ImagePolicy(), bytes(data)).reason == "decode_error"


def test_random_bytes_are_not_an_image():
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert rejected(ImagePolicy(), data).reason == "not_an_image"
    assert rejected(ImagePolicy(), b"<html>404</html>").reason == "not_an_image"


def test_empty_bytes():
    error = rejected(ImagePolicy(), b"")
    assert error.reason == "empty"
    assert pickle.loads(pickle.dumps(error)).reason == "empty"


def test_invalid_policy():
    with pytest.raises(ValueError):
        ImagePolicy(mode="border")
    with pytest.raises(ValueError):
        ImagePolicy(quality=0)


# --- pass-through ---------------------------------------------------------------------


def test_baseline_jpeg_that_fits_passes_through_untouched():
    data = encode(scene(5, (200, 120)), "JPEG", quality=80)
    result = ImagePolicy(size=256).process(data)
    assert result.data == data and not result.reencoded
    assert (result.width, result.height) == (200, 120)


def test_mode_none_passes_big_jpeg_through():
    data = encode(scene(6, (900, 600)), "JPEG", quality=80)
    result = ImagePolicy(mode="none").process(data)
    assert result.data == data and not result.reencoded


def test_reencoded_when_needed():
    jpeg = encode(scene(7, (600, 400)), "JPEG", quality=80)
    progressive = encode(scene(7, (200, 120)), "JPEG", quality=80, progressive=True)
    png = encode(scene(7, (200, 120)), "PNG")
    for data in (jpeg, progressive, png):
        result = ImagePolicy(size=256).process(data)
        assert result.reencoded and result.data != data
        assert decode(result.data).format == "JPEG"
    # a square that already fits center_crop needs nothing; a non-square needs a crop
    square = encode(scene(7, (200, 200)), "JPEG", quality=80)
    assert not ImagePolicy(mode="center_crop").process(square).reencoded
    oblong = encode(scene(7, (200, 180)), "JPEG", quality=80)
    assert ImagePolicy(mode="center_crop").process(oblong).reencoded


# --- hashes ---------------------------------------------------------------------------


def test_pixel_sha256_is_about_pixels_not_files():
    img = scene(8, (64, 48))
    as_png = ImagePolicy().process(encode(img, "PNG", compress_level=9))
    resaved = ImagePolicy().process(encode(decode(encode(img, "PNG")), "PNG", compress_level=1))
    as_bmp = ImagePolicy().process(encode(img, "BMP"))
    assert as_png.pixel_sha256 == resaved.pixel_sha256 == as_bmp.pixel_sha256
    assert len(as_png.pixel_sha256) == 64

    changed = img.copy()
    r, g, b = changed.getpixel((10, 10))
    changed.putpixel((10, 10), (r ^ 1, g, b))
    assert ImagePolicy().process(encode(changed)).pixel_sha256 != as_png.pixel_sha256


def test_pixel_sha256_mixes_in_the_shape():
    flat = np.arange(2 * 6 * 3, dtype=np.uint8)
    wide = Image.fromarray(flat.reshape(2, 6, 3))
    tall = Image.fromarray(flat.reshape(3, 4, 3))
    assert wide.tobytes() == tall.tobytes()
    wide_hash, tall_hash = (ImagePolicy().process(encode(img)).pixel_sha256 for img in (wide, tall))
    assert wide_hash != tall_hash


def test_pixel_sha256_is_taken_on_the_stored_pixels_after_orientation():
    img = scene(9, (600, 400))
    small = ImagePolicy(size=64).process(encode(img))
    again = ImagePolicy(size=64).process(encode(img, "BMP"))  # same pixels in another container
    large = ImagePolicy(size=300).process(encode(img))
    assert small.pixel_sha256 == again.pixel_sha256
    assert small.pixel_sha256 != large.pixel_sha256  # what is stored is what is compared

    exif = Image.Exif()
    exif[0x0112] = 6
    rotated_file = ImagePolicy().process(encode(img, "PNG", exif=exif.tobytes()))
    upright = ImagePolicy().process(encode(img.transpose(Image.Transpose.ROTATE_270)))
    assert rotated_file.pixel_sha256 == upright.pixel_sha256


def test_phash_is_64_bits_and_stable():
    value = phash(scene(10))
    assert 0 <= value < 2**64
    assert phash(scene(10)) == value
    assert ImagePolicy().process(encode(scene(10))).phash == value


def test_phash_survives_jpeg_and_half_size():
    for seed in range(4):
        img = scene(20 + seed)
        original = phash(img)
        jpeg = decode(encode(img, "JPEG", quality=70))
        half = img.resize((128, 128), Image.Resampling.LANCZOS)
        assert hamming(original, phash(jpeg)) <= 6
        assert hamming(original, phash(half)) <= 6


def test_phash_separates_different_scenes():
    hashes = [phash(scene(40 + seed)) for seed in range(6)]
    distances = [hamming(a, b) for a, b in itertools.combinations(hashes, 2)]
    assert min(distances) >= 12
    assert np.mean(distances) >= 20


def test_phash_of_blank_images_is_not_noise():
    greys = (9, 128, 250)
    blanks = [phash(Image.new("RGB", (50 + 7 * i, 40), (g, g, g))) for i, g in enumerate(greys)]
    assert blanks[0] == blanks[1] == blanks[2] == 1 << 63  # only the DC bit
    assert hamming(phash(Image.new("RGB", (50, 50))), blanks[0]) == 1


def test_hamming():
    assert hamming(0, 0) == 0
    assert hamming(0, 2**64 - 1) == 64
    assert hamming(0b1010, 0b0110) == 2


# --- img2dataset resizer --------------------------------------------------------------


def test_img2dataset_resizer_success():
    resizer = ImagePolicy(size=64).as_img2dataset_resizer()
    stream = io.BytesIO(encode(scene(11, (200, 100)), "PNG"))
    stream.read()  # img2dataset seeks before calling; do not rely on it
    img_bytes, width, height, original_width, original_height, error = resizer(stream, None)
    assert error is None
    assert (width, height, original_width, original_height) == (128, 64, 200, 100)
    assert isinstance(img_bytes, bytes) and isinstance(img_bytes, EncodedImage)
    assert decode(img_bytes).size == (128, 64)
    assert bytes(img_bytes) == img_bytes.processed.data
    assert img_bytes.processed.phash == phash(scene(11, (200, 100)))

    copy = pickle.loads(pickle.dumps(img_bytes))
    assert copy == img_bytes and copy.processed == img_bytes.processed
    assert pickle.loads(pickle.dumps(resizer))(io.BytesIO(bytes(img_bytes)))[5] is None


def test_img2dataset_resizer_failure():
    resizer = ImagePolicy().as_img2dataset_resizer()
    result = resizer(io.BytesIO(b"not an image at all"))
    assert result[:5] == (None, None, None, None, None)
    assert result[5].startswith("not_an_image: ")
    assert resizer(io.BytesIO(b""))[5] == "empty"
    blurred = resizer(io.BytesIO(encode(scene(12))), [[0.1, 0.1, 0.2, 0.2]])
    assert blurred[0] is None and blurred[5].startswith("blurring_unsupported")
