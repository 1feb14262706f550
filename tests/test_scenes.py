import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from synthetic.scenes import (
    COLOURS,
    KINDS,
    POSITIONS,
    SIZES,
    Scene,
    SceneObject,
    reading_order,
    SceneOptions,
    alt_text,
    describe,
    detokenize,
    labelled_alt_text,
    parse_description,
    render,
    render_masks,
    sample_scene,
    tokenize,
    vocabulary,
)

SEEDS = range(150)
DENSE = SceneOptions(min_objects=3, max_objects=6, image_sizes=((128, 128), (192, 128), (128, 192)))


def scene_for(seed: int, options: SceneOptions | None = None) -> Scene:
    return sample_scene(np.random.default_rng(seed), options)


def test_same_seed_same_scene_and_pixels():
    a, b = scene_for(7), scene_for(7)
    assert a == b
    assert render(a).tobytes() == render(b).tobytes()
    assert len({json.dumps(scene_for(s).to_dict()) for s in range(20)}) == 20


def test_sizes_and_aspect_ratios_vary():
    shapes = {(s.width, s.height) for s in map(scene_for, SEEDS)}
    assert any(w > h for w, h in shapes) and any(w < h for w, h in shapes) and any(w == h for w, h in shapes)
    assert min(min(s) for s in shapes) >= 64 and max(max(s) for s in shapes) <= 160


@pytest.mark.parametrize("options", [None, DENSE], ids=["default", "dense"])
def test_objects_visible_disjoint_and_distinct_from_background(options):
    for seed in SEEDS:
        scene = scene_for(seed, options)
        lo = (options or SceneOptions()).min_objects
        assert lo <= len(scene.objects) <= (options or SceneOptions()).max_objects
        masks = render_masks(scene)
        total = np.zeros((scene.height, scene.width), dtype=int)
        for obj, mask in zip(scene.objects, masks):
            assert obj.colour != scene.background
            assert mask.sum() > 0.25 * obj.extent**2, "a shape should fill a good part of its square"
            x, y, w, h = obj.bbox
            assert 0 <= x and 0 <= y and x + w <= scene.width and y + h <= scene.height
            ys, xs = np.nonzero(mask)
            assert xs.min() >= x and xs.max() < x + w and ys.min() >= y and ys.max() < y + h
            total += mask
        assert total.max() <= 1, "objects overlap"


def test_position_words_match_centres():
    for seed in SEEDS:
        scene = scene_for(seed, DENSE if seed % 2 else None)
        for obj in scene.objects:
            cx, cy = obj.centre
            row, col = 3 * cy // scene.height, 3 * cx // scene.width
            assert obj.position == POSITIONS[row * 3 + col]
            assert obj.extent == max(4, round(SIZES[obj.size] * min(scene.width, scene.height)))


@pytest.mark.parametrize("allow_overlap", [False, True])
def test_masks_agree_with_rendered_pixels(allow_overlap):
    options = SceneOptions(min_objects=2, max_objects=5, allow_overlap=allow_overlap, textured_fraction=0.6)
    for seed in range(60):
        scene = scene_for(seed, options)
        pixels = np.asarray(render(scene))
        assert pixels.shape == (scene.height, scene.width, 3)
        masks = render_masks(scene)
        union = np.zeros(pixels.shape[:2], dtype=bool)
        for obj, mask in zip(scene.objects, masks):
            assert not (mask & union).any()
            assert (pixels[mask] == COLOURS[obj.colour]).all()
            union |= mask
        background = pixels[~union]
        for obj in scene.objects:
            assert not (background == COLOURS[obj.colour]).all(axis=1).any()


def test_occlusion_hides_earlier_objects():
    big = SceneObject("square", "red", "large", (32, 32), 30, (17, 17, 30, 30), "center")
    small = SceneObject("circle", "blue", "small", (32, 32), 12, (26, 26, 12, 12), "center")
    scene = Scene(64, 64, "white", "plain", (big, small))
    red, blue = render_masks(scene)
    assert blue[32, 32] and not red[32, 32]
    assert red.sum() == 30 * 30 - blue.sum()


def test_colours_survive_jpeg():
    palette = np.array(list(COLOURS.values()), dtype=float)
    names = list(COLOURS)
    for seed in range(60):
        scene = scene_for(seed)
        buf = io.BytesIO()
        render(scene).save(buf, format="JPEG", quality=75)
        decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=float)
        for obj, mask in zip(scene.objects, render_masks(scene)):
            median = np.median(decoded[mask], axis=0)
            assert names[int(np.argmin(((palette - median) ** 2).sum(axis=1)))] == obj.colour


def test_describe_exact_sentence():
    objects = (
        SceneObject("circle", "red", "large", (10, 10), 29, (-4, -4, 29, 29), "top left"),
        SceneObject("star", "blue", "small", (32, 32), 13, (26, 26, 13, 13), "center"),
        SceneObject("ring", "green", "medium", (54, 54), 20, (44, 44, 20, 20), "bottom right"),
    )
    scene = Scene(64, 64, "yellow", "plain", objects)
    assert describe(scene) == (
        "A large red circle at the top left, a small blue star in the center and "
        "a medium green ring at the bottom right, on a plain yellow background."
    )
    assert describe(Scene(64, 64, "gray", "stripes", objects[1:2])) == (
        "A small blue star in the center, on a striped gray background."
    )
    # listed in reading order whatever order the scene holds them in: a caption is a function of the image
    assert describe(Scene(64, 64, "black", "noise", objects[2:] + objects[:1])) == (
        "A large red circle at the top left and a medium green ring at the bottom right, on a noisy black background."
    )


def test_describe_covers_every_object_with_grammar_words_only():
    vocab = set(vocabulary())
    assert vocab >= set(KINDS) | set(COLOURS) | set(SIZES) | {",", "."}
    assert vocabulary() == sorted(vocab)
    for seed in SEEDS:
        scene = scene_for(seed, DENSE if seed % 2 else None)
        text = describe(scene)
        assert set(tokenize(text)) <= vocab
        assert detokenize(tokenize(text)) == text
        parsed = parse_description(text)
        assert parsed.objects == [(o.size, o.colour, o.kind, o.position) for o in reading_order(scene.objects)]
        assert (parsed.texture, parsed.background) == (scene.texture, scene.background)


def test_to_dict_round_trips_through_json():
    for seed in range(30):
        scene = scene_for(seed, DENSE)
        again = Scene.from_dict(json.loads(json.dumps(scene.to_dict())))
        assert again == scene
        assert render(again).tobytes() == render(scene).tobytes()


def test_alt_text_is_laion_like():
    scenes = [scene_for(s) for s in range(400)]
    labelled = [labelled_alt_text(sc, np.random.default_rng(s)) for s, sc in enumerate(scenes)]
    labels = Counter(label for _, label in labelled)
    assert 0.4 < labels["true"] / 400 < 0.6
    assert 0.05 < labels["wrong"] / 400 < 0.16
    assert 0.2 < labels["noise"] / 400 < 0.4
    assert 0.05 < labels["empty"] / 400 < 0.16
    texts = [t for t, _ in labelled]
    assert len(set(texts)) > 120
    assert all(len(t) < 80 for t in texts)
    for scene, (text, label) in zip(scenes, labelled):
        words = set(text.lower().split())
        colours = {o.colour for o in scene.objects} | {scene.background}
        kinds = {o.kind for o in scene.objects}
        if label == "empty":
            assert text == ""
        elif label == "true":
            assert words & (colours | kinds | {k + "s" for k in kinds})
        elif label == "wrong":
            named_colour = next(w for w in words if w in COLOURS)
            named_kind = next(w for w in words if w in KINDS)
            assert named_colour not in colours or named_kind not in kinds
    assert alt_text(scenes[0], np.random.default_rng(0)) == labelled[0][0]
