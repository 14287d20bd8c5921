"""The labeled-set folder format: exact round trips, atomic writes, and one-line errors naming the file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from handsoff.data import read_labeled_set, render_to_folder, write_labeled_set
from handsoff.domains import LabeledBatch, get_domain
from handsoff.errors import HandsoffError

SIZE = 32


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def batch() -> LabeledBatch:
    return get_domain().render(4, 7, SIZE)


def _meta() -> dict:
    domain = get_domain()
    return {"classes": list(domain.classes), "keypoint_names": list(domain.keypoint_names), "domain": "heads",
            "seed": 7, "size": SIZE}


@pytest.fixture()
def folder(tmp_path: Path, batch: LabeledBatch) -> Path:
    return write_labeled_set(batch, tmp_path / "set", _meta())


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_round_trip_is_exact(folder: Path, batch: LabeledBatch) -> None:
    loaded = read_labeled_set(folder)
    assert loaded.names == batch.names
    again = loaded.to_batch()
    for field in ("images", "seg", "depth", "keypoints"):
        assert getattr(again, field).dtype == getattr(batch, field).dtype
        assert np.array_equal(getattr(again, field), getattr(batch, field)), field
    assert loaded.classes == get_domain().classes and loaded.keypoint_names == get_domain().keypoint_names
    assert loaded.meta["seed"] == 7 and loaded.meta["count"] == 4
    assert sorted(os.listdir(folder)) == ["depth", "images", "keypoints.json", "meta.json", "seg"]


def test_iterable_of_batches_and_overwrite(tmp_path: Path, batch: LabeledBatch) -> None:
    out = write_labeled_set([batch.select(slice(0, 1)), batch.select(slice(1, 4))], tmp_path / "set", _meta())
    assert read_labeled_set(out).names == batch.names
    with pytest.raises(HandsoffError, match="not empty"):
        write_labeled_set(batch, out, _meta())
    write_labeled_set(batch.select([2]), out, _meta(), overwrite=True)
    assert read_labeled_set(out).names == [batch.names[2]]
    assert _leftovers(tmp_path) == []


def test_render_to_folder_matches_render(tmp_path: Path) -> None:
    out = render_to_folder(get_domain(), 5, 3, SIZE, tmp_path / "rendered", chunk=2, progress=False)
    loaded = read_labeled_set(out).to_batch()
    direct = get_domain().render(5, 3, SIZE)
    assert loaded.names == direct.names and np.array_equal(loaded.images, direct.images)
    assert read_labeled_set(out).meta["background_depth"] == 10.0


def test_nothing_half_written_on_failure(tmp_path: Path, batch: LabeledBatch) -> None:
    def chunks() -> Iterator[LabeledBatch]:
        yield batch.select(slice(0, 2))
        raise RuntimeError("renderer crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        write_labeled_set(chunks(), tmp_path / "set", _meta())
    bad_seg = LabeledBatch(batch.images, np.full_like(batch.seg, 77), batch.depth, batch.keypoints, batch.names)
    with pytest.raises(HandsoffError, match="class 77"):
        write_labeled_set(bad_seg, tmp_path / "set", _meta())
    with pytest.raises(HandsoffError, match="twice"):
        write_labeled_set([batch, batch], tmp_path / "set", _meta())
    assert os.listdir(tmp_path) == []


def _first(folder: Path, sub: str, suffix: str) -> Path:
    return sorted((folder / sub).glob(f"*{suffix}"))[0]


def _expect(folder: Path, culprit: str, problem: str) -> None:
    with pytest.raises(HandsoffError) as info:
        read_labeled_set(folder)
    message = str(info.value)
    assert culprit in message and problem in message, message
    assert "\n" not in message


def test_missing_images_folder(folder: Path) -> None:
    for path in (folder / "images").iterdir():
        path.unlink()
    (folder / "images").rmdir()
    _expect(folder, "images", "missing images folder")


@pytest.mark.parametrize("content", [b"", b"not a png at all"])
def test_unreadable_or_empty_image(folder: Path, content: bytes) -> None:
    path = _first(folder, "images", ".png")
    path.write_bytes(content)
    _expect(folder, path.name, "unreadable or empty image")


def test_label_map_size_differs(folder: Path) -> None:
    path = _first(folder, "seg", ".png")
    Image.fromarray(np.zeros((SIZE, SIZE + 3), np.uint8)).save(path)
    _expect(folder, path.name, f"label map is {SIZE + 3}x{SIZE} but its image is {SIZE}x{SIZE}")


def test_class_id_out_of_range(folder: Path) -> None:
    path = _first(folder, "seg", ".png")
    labels = np.array(Image.open(path))
    labels[0, 0], labels[1, 1] = 255, 11  # 255 (ignore) is fine, 11 is past the 11 classes
    Image.fromarray(labels).save(path)
    _expect(folder, path.name, "class id 11 outside 0..10")


def test_visible_keypoint_outside_image(folder: Path, batch: LabeledBatch) -> None:
    path = folder / "keypoints.json"
    data = json.loads(path.read_text())
    data["points"][batch.names[1]][4] = [SIZE + 5.0, 3.0, 1]
    path.write_text(json.dumps(data))
    _expect(folder, "keypoints.json", f"'nose_tip' (4) of {batch.names[1]!r} at ({SIZE + 5}, 3) lies outside")
    data["points"][batch.names[1]][4] = [SIZE + 5.0, 3.0, 0]  # an invisible one may lie anywhere
    path.write_text(json.dumps(data))
    read_labeled_set(folder)


def test_keypoints_for_some_images_only(folder: Path, batch: LabeledBatch) -> None:
    path = folder / "keypoints.json"
    data = json.loads(path.read_text())
    del data["points"][batch.names[2]]
    path.write_text(json.dumps(data))
    _expect(folder, "keypoints.json", f"no keypoints for image {batch.names[2]!r}")


def test_depth_for_some_images_only(folder: Path, batch: LabeledBatch) -> None:
    (folder / "depth" / f"{batch.names[3]}.npy").unlink()
    _expect(folder, f"{batch.names[3]}.npy", "depth/ must cover every image")


def test_bad_depth_and_stray_label(folder: Path, batch: LabeledBatch) -> None:
    np.save(folder / "depth" / f"{batch.names[0]}.npy", np.zeros((3, 3), np.float32))
    _expect(folder, f"{batch.names[0]}.npy", "depth must be float")
    np.save(folder / "depth" / f"{batch.names[0]}.npy", batch.depth[0])
    Image.fromarray(batch.seg[0]).save(folder / "seg" / "stranger.png")
    _expect(folder, "stranger.png", "has no matching image")


def test_seg_needs_class_names(folder: Path) -> None:
    (folder / "meta.json").unlink()
    _expect(folder, "meta.json", "needs meta.json with 'classes'")


def test_bad_json(folder: Path) -> None:
    (folder / "meta.json").write_text("{not json")
    _expect(folder, "meta.json", "cannot read JSON")


def test_images_only_is_a_valid_set(folder: Path) -> None:
    for sub in ("seg", "depth"):
        for path in (folder / sub).iterdir():
            path.unlink()
        (folder / sub).rmdir()
    (folder / "keypoints.json").unlink()
    loaded = read_labeled_set(folder)
    assert loaded.seg is None and loaded.depth is None and loaded.keypoints is None and len(loaded) == 4
    with pytest.raises(HandsoffError, match="to_batch needs"):
        loaded.to_batch()


def test_a_set_without_keypoints_reads_back(tmp_path: Path, batch: LabeledBatch) -> None:
    import dataclasses

    bare = dataclasses.replace(batch, keypoints=batch.keypoints[:, :0])
    out = write_labeled_set(bare, tmp_path / "set", {**_meta(), "keypoint_names": []})
    assert not (out / "keypoints.json").exists()
    labels = read_labeled_set(out)
    assert labels.keypoints is None and len(labels) == len(batch)
