import json

import numpy as np
import pytest

from synthetic.sa1b import (
    annotation_for,
    counts_to_string,
    image_record,
    mask_bbox,
    rle_decode,
    rle_encode,
    string_to_counts,
)


def _edge_masks() -> dict[str, np.ndarray]:
    single = np.zeros((5, 7), dtype=bool)
    single[3, 4] = True
    first = np.zeros((4, 6), dtype=bool)
    first[0, 0] = True
    last = np.zeros((4, 6), dtype=bool)
    last[-1, -1] = True
    return {
        "zeros": np.zeros((6, 9), dtype=bool),
        "ones": np.ones((6, 9), dtype=bool),
        "single": single,
        "first": first,
        "last": last,
        "row": np.ones((1, 40), dtype=bool),
        "column": np.ones((40, 1), dtype=bool),
        "big_ones": np.ones((300, 400), dtype=bool),
    }


@pytest.mark.parametrize("name", list(_edge_masks()))
def test_round_trip_edge_masks(name):
    mask = _edge_masks()[name]
    rle = rle_encode(mask)
    assert rle["size"] == list(mask.shape)
    assert isinstance(rle["counts"], str)
    decoded = rle_decode(json.loads(json.dumps(rle)))
    assert decoded.dtype == bool and decoded.shape == mask.shape
    assert (decoded == mask).all()


def test_round_trip_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = rng.integers(1, 60, size=2)
        mask = rng.random((h, w)) < rng.random()
        assert (rle_decode(rle_encode(mask)) == mask).all()
    # Long runs exercise multi-group and negative deltas.
    mask = np.zeros((500, 300), dtype=bool)
    mask[100:400, 50:250] = True
    mask[0:3, 0] = True
    assert (rle_decode(rle_encode(mask)) == mask).all()


def test_known_compressed_strings():
    # 1x50 mask: runs (column-major, zeros first) are [0, 5, 40, 3, 2].
    # 0 -> '0'; 5 -> '5'; 40 -> 8|0x20 then 1 -> 'X1';
    # 3-5=-2 -> 30 (sign bit, stop) -> 'N'; 2-40=-38 -> 26|0x20 then 30 -> 'jN'.
    mask = np.zeros((1, 50), dtype=bool)
    mask[0, 0:5] = True
    mask[0, 45:48] = True
    assert rle_encode(mask) == {"size": [1, 50], "counts": "05X1NjN"}
    # Column-major order: [[0,1],[1,1]] flattens to 0,1,1,1.
    assert rle_encode(np.array([[0, 1], [1, 1]], dtype=bool))["counts"] == "13"
    # 120000 needs four 5-bit groups: 0|0x20, 6|0x20, 21|0x20 (sign bit set, so keep going), 3.
    assert rle_encode(np.ones((300, 400), dtype=bool))["counts"] == "0PVe3"
    assert string_to_counts("05X1NjN") == [0, 5, 40, 3, 2]
    assert counts_to_string([0, 5, 40, 3, 2]) == "05X1NjN"


def test_decode_rejects_wrong_total_and_accepts_uncompressed():
    with pytest.raises(ValueError):
        rle_decode({"size": [2, 2], "counts": "12"})
    assert (rle_decode({"size": [2, 2], "counts": [1, 3]}) == np.array([[0, 1], [1, 1]], dtype=bool)).all()


def test_annotation_fields():
    mask = np.zeros((40, 60), dtype=bool)
    mask[5:15, 20:50] = True
    ann = annotation_for(mask, 17, np.random.default_rng(0))
    assert set(ann) == {"id", "segmentation", "bbox", "area", "predicted_iou", "stability_score", "point_coords", "crop_box"}
    assert ann["id"] == 17
    assert ann["bbox"] == [20.0, 5.0, 30.0, 10.0] == [float(v) for v in mask_bbox(mask)]
    assert ann["area"] == 300
    assert (rle_decode(ann["segmentation"]) == mask).all()
    assert 0.8 < ann["predicted_iou"] < 1.05 and 0.9 < ann["stability_score"] <= 1.0
    (x, y), = ann["point_coords"]
    assert mask[int(y), int(x)]
    assert ann["crop_box"] == [0.0, 0.0, 60.0, 40.0]
    json.dumps(ann)
    with pytest.raises(ValueError):
        annotation_for(np.zeros((4, 4), dtype=bool), 1, np.random.default_rng(0))


def test_image_record():
    assert image_record(3, 192, 128, "sa_3.jpg") == {"image_id": 3, "width": 192, "height": 128, "file_name": "sa_3.jpg"}
