"""The corpus format: shard files, the manifest and ShardDataset."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from handsoff.data import ShardDataset
from handsoff.data.shards import (Manifest, ShardEntry, ShardRecords, read_manifest, read_shard, shard_name,
                                  write_manifest, write_shard)
from handsoff.errors import HandsoffError
from handsoff.utils.io import sha256_file

CLASSES = ("background", "a", "b")
KEYPOINTS = ("p", "q")


def records(n: int, start: int = 0, size: int = 8, seg: bool = True, depth: bool = True,
            keypoints: bool = True) -> ShardRecords:
    rng = np.random.default_rng(start)
    return ShardRecords(
        images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        seeds=np.arange(start, start + n, dtype=np.int64) + 100, index=np.arange(start, start + n, dtype=np.int64),
        uncertainty=rng.random(n, dtype=np.float32), scores={"seg_js": rng.random(n, dtype=np.float32)},
        seg=rng.integers(0, 3, (n, size, size), dtype=np.uint8) if seg else None,
        depth=rng.random((n, size, size)).astype(np.float16) if depth else None,
        keypoints=rng.random((n, 2, 3)).astype(np.float32) if keypoints else None)


def write_corpus(root, sizes=(5, 3), **kinds) -> Manifest:
    """A corpus folder written directly through the format functions (no generator)."""
    has = {k: kinds.get(k, True) for k in ("seg", "depth", "keypoints")}
    manifest = Manifest({"settings": {"n": sum(sizes)}}, 8, CLASSES if has["seg"] else (),
                        KEYPOINTS if has["keypoints"] else (), has["depth"], len(sizes))
    start = 0
    for k, n in enumerate(sizes):
        path = write_shard(root / shard_name(k), records(n, start, **kinds), {"shard": k},
                           classes=CLASSES, keypoint_names=KEYPOINTS)
        manifest = manifest.with_shard(ShardEntry(path.name, k, (start, start + n), n, n, sha256_file(path),
                                                  path.stat().st_size))
        start += n
    write_manifest(root, manifest)
    return manifest


def test_shard_bytes_do_not_depend_on_the_time_of_writing(tmp_path):
    rec = records(4)
    a = write_shard(tmp_path / "a.h5", rec, {"shard": 0, "identity": {"x": [1, 2]}}, classes=CLASSES)
    time.sleep(1.1)  # HDF5 timestamps have one-second resolution
    b = write_shard(tmp_path / "b.h5", rec, {"shard": 0, "identity": {"x": [1, 2]}}, classes=CLASSES)
    assert a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_shard_round_trip(tmp_path):
    rec = records(5)
    rec.keep = np.array([1, 0, 1, 1, 0], dtype=bool)
    rec.ws = np.ones((5, 4, 2), np.float32)
    path = write_shard(tmp_path / shard_name(3), rec, {"shard": 3, "indices": [0, 5]}, classes=CLASSES,
                       keypoint_names=KEYPOINTS)
    assert path.name == "shard-00003.h5"
    back, attrs = read_shard(path)
    assert attrs["format"] == "handsoff-shard" and attrs["shard"] == 3 and attrs["indices"] == [0, 5]
    for name in ("images", "seeds", "index", "uncertainty", "seg", "keypoints", "keep", "ws"):
        np.testing.assert_array_equal(getattr(back, name), getattr(rec, name))
    np.testing.assert_array_equal(back.depth, rec.depth.astype(np.float32))
    np.testing.assert_array_equal(back.scores["seg_js"], rec.scores["seg_js"])
    import h5py

    with h5py.File(path) as f:
        assert f["depth"].dtype == np.float16 and f["images"].dtype == np.uint8 and f["seeds"].dtype == np.int64
        assert json.loads(f["seg"].attrs["classes"]) == list(CLASSES)
        assert json.loads(f["keypoints"].attrs["names"]) == list(KEYPOINTS)


def test_records_select_concat_put():
    a, b = records(3, 0), records(2, 3)
    both = ShardRecords.concat([a, b])
    assert len(both) == 5 and list(both.index) == [0, 1, 2, 3, 4]
    picked = both.select(np.array([4, 0]))
    assert list(picked.index) == [4, 0] and picked.scores["seg_js"][0] == b.scores["seg_js"][1]
    both.put(np.array([1]), b.select([0]))
    assert both.index[1] == 3 and np.array_equal(both.images[1], b.images[0])


def test_manifest_round_trip_and_bad_manifests(tmp_path):
    manifest = write_corpus(tmp_path)
    assert read_manifest(tmp_path) == manifest and manifest.complete and manifest.kept == 8
    assert read_manifest(tmp_path / "nothing-here") is None
    first = (tmp_path / "manifest.json").read_bytes()
    write_manifest(tmp_path, read_manifest(tmp_path))
    assert (tmp_path / "manifest.json").read_bytes() == first  # deterministic bytes
    for text in ("{", json.dumps({"format": "other"}), json.dumps({"format": "handsoff-corpus", "version": 1})):
        (tmp_path / "manifest.json").write_text(text)
        with pytest.raises(HandsoffError) as err:
            read_manifest(tmp_path)
        assert "manifest.json" in str(err.value) and "\n" not in str(err.value)


def test_dataset_items(tmp_path):
    write_corpus(tmp_path, sizes=(5, 3))
    ds = ShardDataset(tmp_path)
    assert len(ds) == 8 and ds.classes == CLASSES and ds.keypoint_names == KEYPOINTS and ds.resolution == 8
    item = ds[6]
    assert set(item) == {"image", "seg", "depth", "keypoints", "uncertainty", "seed"}
    expect = {"image": (torch.uint8, (3, 8, 8)), "seg": (torch.int64, (8, 8)), "depth": (torch.float32, (8, 8)),
              "keypoints": (torch.float32, (2, 3)), "uncertainty": (torch.float32, ()), "seed": (torch.int64, ())}
    assert {k: (v.dtype, tuple(v.shape)) for k, v in item.items()} == expect
    rec = records(3, 5)
    assert torch.equal(item["image"], torch.from_numpy(rec.images[1]).permute(2, 0, 1))
    assert int(item["seed"]) == 106 and torch.equal(item["seg"], torch.from_numpy(rec.seg[1]).long())
    assert ds.locate(-1) == (1, 2)
    with pytest.raises(IndexError):
        ds[8]


def test_dataset_without_optional_labels(tmp_path):
    write_corpus(tmp_path, sizes=(2,), seg=False, depth=False, keypoints=False)
    ds = ShardDataset(tmp_path)
    assert set(ds[0]) == {"image", "uncertainty", "seed"} and ds.classes == () and ds.keypoint_names == ()


def test_dataset_with_two_dataloader_workers(tmp_path):
    write_corpus(tmp_path, sizes=(5, 3))
    ds = ShardDataset(tmp_path)
    ds[0]  # opens a handle in this process: the workers must not reuse it
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    batches = list(loader)
    assert sum(len(b["seed"]) for b in batches) == 8
    seeds = torch.cat([b["seed"] for b in batches])
    assert seeds.tolist() == [int(ds[i]["seed"]) for i in range(8)]
    assert torch.equal(torch.cat([b["image"] for b in batches])[7], ds[7]["image"])


def test_dataset_errors_name_the_file(tmp_path):
    with pytest.raises(HandsoffError, match="no manifest.json"):
        ShardDataset(tmp_path)
    write_corpus(tmp_path)
    (tmp_path / shard_name(1)).unlink()
    with pytest.raises(HandsoffError, match="shard-00001.h5: listed in manifest.json but missing"):
        ShardDataset(tmp_path)
