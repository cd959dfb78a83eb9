"""EuroSAT RGB for training: the split is deterministic, stratified and recorded; the decoded
cache is reused only when it matches; bad data fails clearly or is skipped and counted."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest

from nec_models.eurosat import (
    CLASSES,
    SPLITS,
    Item,
    decode,
    make_split,
    read_split,
    scan,
    write_split,
)
from nec_serve.errors import InvalidInput


@pytest.fixture()
def small(eurosat, tmp_path):
    """Four real patches of each of three classes, copied (the sample data is read-only)."""
    root = tmp_path / "eurosat"
    for name in CLASSES[:3]:
        (root / name).mkdir(parents=True)
        for f in sorted((eurosat / name).glob("*.jpg"))[:4]:
            shutil.copy(f, root / name / f.name)
    return root


def test_the_split_is_deterministic_stratified_and_disjoint(eurosat):
    items = scan(eurosat)  # the sample data: 30 real patches of each class
    assert len(items) == 300 and {i.label for i in items} == set(range(len(CLASSES)))
    split = make_split(items, seed=0)
    assert make_split(items, seed=0) == split
    assert make_split(items, seed=1) != split
    parts = [set(split[s]) for s in SPLITS]
    assert sum(map(len, parts)) == len(items) and not (parts[0] & parts[1] | parts[0] & parts[2])
    total = Counter(i.label for i in items)
    for name, share in zip(SPLITS, (0.8, 0.1, 0.1), strict=True):
        counts = Counter(i.label for i in split[name])
        for label, n in total.items():
            assert abs(counts[label] - share * n) <= 1, (name, CLASSES[label])


def test_the_split_file_round_trips(eurosat, tmp_path):
    split = make_split(scan(eurosat), seed=0)
    digest = write_split(split, tmp_path / "split.csv")
    assert len(digest) == 64 and read_split(tmp_path / "split.csv") == split


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("path,label,split\nForest/F_1.jpg,Jungle,train\n", "2: unknown class 'Jungle'"),
        ("path,label,split\nForest/F_1.jpg,Forest,holdout\n", "unknown split 'holdout'"),
        ("path,label,split\n../etc/passwd,Forest,train\n", "is not inside the dataset"),
        ("path,label,split\nF/a.jpg,Forest,train\nF/a.jpg,Forest,test\n", "3: 'F/a.jpg' is listed"),
        ("path,label,split\nF/a.jpg,Forest\n", "expected 3 fields"),
        ("name,class\n", "not a split file"),
        ("", "not a split file"),
    ],
)
def test_a_bad_split_file_names_the_line(text, match, tmp_path):
    (tmp_path / "split.csv").write_text(text)
    with pytest.raises(InvalidInput, match=match):
        read_split(tmp_path / "split.csv")


def test_bad_data_folders(tmp_path, small):
    with pytest.raises(InvalidInput, match="no such data folder"):
        scan(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="no images"):
        scan(tmp_path / "empty")
    (small / "Jungle").mkdir()
    with pytest.raises(InvalidInput, match="'Jungle' is not a EuroSAT class"):
        scan(small)


def test_decode_skips_and_counts_bad_images_and_reuses_its_cache(small, tmp_path):
    (small / CLASSES[0] / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (small / CLASSES[0] / "zz_truncated.jpg").write_bytes(
        next((small / CLASSES[1]).glob("*.jpg")).read_bytes()[:200]
    )
    items = scan(small)
    assert len(items) == 14
    cache = tmp_path / "cache" / "train"
    out = decode(small, items, cache)
    assert out.images.shape == (12, 64, 64, 3) and out.images.dtype == np.uint8
    assert sorted(p for p, _ in out.skipped) == [
        f"{CLASSES[0]}/zz_corrupt.jpg",
        f"{CLASSES[0]}/zz_truncated.jpg",
    ]
    assert Counter(out.labels.tolist()) == {0: 4, 1: 4, 2: 4}
    assert 20 < out.images.mean() < 235  # real imagery, not zeros
    again = decode(small, items, cache)
    assert isinstance(again.images, np.memmap)  # from the cache
    np.testing.assert_array_equal(again.images, out.images)
    assert again.skipped == out.skipped
    fewer = decode(small, items[:5], cache)  # another item list: decoded again
    assert len(fewer.labels) == 4 and len(fewer.skipped) == 1


def test_decode_of_nothing_decodable_is_an_error(tmp_path):
    (tmp_path / "Forest").mkdir()
    (tmp_path / "Forest" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InvalidInput, match="none of 1 images could be decoded"):
        decode(tmp_path, [Item("Forest/a.jpg", 1)])
