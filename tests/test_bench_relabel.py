"""A model trained on the labeled images used on other images: agreement scores, agreement
filtering and self-training labels (`handsoff.bench.relabel`)."""
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from handsoff.bench.relabel import (AGREEMENT_PCK, Relabeled, agreement_scores, keep_most_agreeing,
                                    predict_dataset)
from handsoff.bench.train import train_and_score
from handsoff.data.folder_dataset import LabeledFolderDataset
from handsoff.data.labeled_set import IGNORE_INDEX, render_to_folder
from handsoff.domains import get_domain
from handsoff.errors import HandsoffError

SIZE = 32


class Items(Dataset):
    """Items as a corpus holds them, built in memory."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _item(seg=None, keypoints=None, depth=None):
    item = {"image": torch.zeros(3, 8, 8, dtype=torch.uint8)}
    for key, value in (("seg", seg), ("keypoints", keypoints), ("depth", depth)):
        if value is not None:
            item[key] = torch.as_tensor(value)
    return item


def test_seg_agreement_is_mean_iou_over_present_classes_ignoring_unlabelled_pixels():
    label = np.zeros((8, 8), np.int64)
    label[:4] = 1
    label[7, 7] = IGNORE_INDEX
    same, half = label.copy(), label.copy()
    same[7, 7] = 2  # an ignored pixel does not count
    half[:2] = 0  # class 1: 16 of 32 pixels; class 0: 32 of 48
    data = Items([_item(seg=label), _item(seg=label)])
    scores = agreement_scores(data, "seg", np.stack([same, half]).astype(np.uint8))
    assert scores[0] == pytest.approx(1.0)
    assert scores[1] == pytest.approx((16 / 32 + 31 / 47) / 2)


def test_keypoint_agreement_is_the_share_of_visible_points_near_the_prediction():
    label = np.array([[2.0, 2.0, 1.0], [5.0, 5.0, 1.0], [1.0, 1.0, 0.0]], np.float32)
    near = AGREEMENT_PCK * 8 * 0.9
    predicted = np.array([[[2.0 + near, 2.0], [0.0, 0.0], [7.0, 7.0]]], np.float32)
    data = Items([_item(keypoints=label)])
    assert agreement_scores(data, "keypoints", predicted)[0] == pytest.approx(0.5)  # the hidden point does not count
    hidden = Items([_item(keypoints=np.zeros((3, 3), np.float32))])
    assert agreement_scores(hidden, "keypoints", predicted)[0] == 0.0


def test_depth_agreement_is_minus_log_rmse_over_valid_labels():
    label = np.full((8, 8), 2.0, np.float32)
    label[0] = np.nan
    predicted = np.full((1, 8, 8), 2.0 * np.e, np.float32)
    scores = agreement_scores(Items([_item(depth=label)]), "depth", predicted)
    assert scores[0] == pytest.approx(-1.0, abs=1e-6)


def test_keeping_the_most_agreeing_share():
    data = Items([_item() for _ in range(10)])
    scores = np.arange(10.0)
    assert keep_most_agreeing(data, scores, 0.3).indices == [7, 8, 9]
    assert keep_most_agreeing(data, np.zeros(10), 0.3).indices == [0, 1, 2]  # ties: the first, the share asked
    assert keep_most_agreeing(data, np.array([0, 1, 1, 0, 1, 0, 0, 0, 0, 0.0]), 0.2).indices == [1, 2]
    assert len(keep_most_agreeing(data, scores, 1.0)) == 10
    with pytest.raises(HandsoffError, match="in \\(0, 1\\]"):
        keep_most_agreeing(data, scores, 0.0)
    with pytest.raises(HandsoffError, match="9 agreement scores for a set of 10"):
        keep_most_agreeing(data, scores[:9], 0.5)


def test_relabeled_items_carry_the_predictions():
    data = Items([_item(seg=np.zeros((8, 8)), keypoints=np.zeros((2, 3)), depth=np.ones((8, 8)))])
    kp = Relabeled(data, "keypoints", np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32))
    item = kp[0]
    assert item["keypoints"].tolist() == [[1.0, 2.0, 1.0], [3.0, 4.0, 1.0]]
    assert item["seg"].sum() == 0 and data[0]["keypoints"].sum() == 0  # the rest, and the source, untouched
    seg = Relabeled(data, "seg", np.ones((1, 8, 8), np.uint8))
    assert seg[0]["seg"].dtype == torch.int64 and int(seg[0]["seg"].sum()) == 64
    with pytest.raises(HandsoffError, match="2 predictions for a set of 1"):
        Relabeled(data, "depth", np.ones((2, 8, 8), np.float32))


@pytest.fixture(scope="module")
def sets(tmp_path_factory, single_torch_thread):
    root = tmp_path_factory.mktemp("relabel")
    heads = get_domain("heads")
    return {"labeled": render_to_folder(heads, 4, 21, SIZE, root / "labeled", progress=False),
            "other": render_to_folder(heads, 6, 22, SIZE, root / "other", progress=False),
            "test": render_to_folder(heads, 4, 23, SIZE, root / "test", progress=False)}


@pytest.mark.parametrize("task", ["seg", "keypoints", "depth"])
def test_self_training_on_a_trained_models_predictions(sets, task):
    labeled = LabeledFolderDataset(sets["labeled"], augment=True)
    result, model = train_and_score([labeled], sets["test"], task, steps=3, batch=4, base=4, levels=3,
                                    progress=False, return_model=True)
    assert result["task"] == task and not model.training
    other = LabeledFolderDataset(sets["other"], augment=False)
    predictions = predict_dataset(model, task, other, batch=4)
    assert len(predictions) == len(other)
    scores = agreement_scores(other, task, predictions)
    assert scores.shape == (len(other),) and np.isfinite(scores).all()
    relabeled = Relabeled(other, task, predictions)
    # Its own predictions agree with themselves as well as a label can.
    best = {"seg": 1.0, "keypoints": 1.0, "depth": 0.0}[task]
    assert agreement_scores(relabeled, task, predictions) == pytest.approx(np.full(len(other), best), abs=1e-5)
    again = train_and_score([relabeled, labeled], sets["test"], task, steps=2, batch=4, base=4, levels=3,
                            progress=False, mix=0.5)
    assert again["train_sets"][0]["path"] == str(sets["other"])
    with pytest.raises(HandsoffError, match="without augmentation"):
        Relabeled(labeled, task, predict_dataset(model, task, labeled))


def test_cli_teacher_filters_corpora_and_self_trains_image_folders(sets, tmp_path):
    import json
    import shutil

    from handsoff.cli import main
    from test_bench_train import _write_corpus

    corpus = _write_corpus(sets["other"], tmp_path / "corpus", n=6)
    common = ["--test", str(sets["test"]), "--task", "keypoints", "--steps", "2", "--batch", "4", "--width", "4",
              "--no-progress"]
    out = tmp_path / "agree.json"
    assert main(["bench", "--train", str(corpus), "--train", str(sets["labeled"]), "--mix", "0.5", "--teacher",
                 str(sets["labeled"]), "--agree-keep", "0.5", "--out", str(out), *common]) == 0
    record = json.loads(out.read_text())
    assert record["extra"]["teacher"]["kept"] == [{"path": str(corpus), "kept": 3, "of": 6}]
    assert [s["size"] for s in record["train_sets"]] == [3, 4]
    images_only = tmp_path / "unlabeled"
    shutil.copytree(sets["other"] / "images", images_only / "images")
    out = tmp_path / "self.json"
    assert main(["bench", "--self-train", str(images_only), "--train", str(sets["labeled"]), "--mix", "0.5",
                 "--teacher", str(sets["labeled"]), "--out", str(out), *common]) == 0
    record = json.loads(out.read_text())
    assert record["train_sets"][0]["kind"] == "teacher-labeled (self-training)"
    assert record["train_sets"][0]["path"] == str(images_only) and record["train_size"] == 6 + 4
    assert "pck@0.05" in record["extra"]["teacher"]["metrics"]


@pytest.mark.parametrize("args, message", [
    (["--agree-keep", "0.5"], "need --teacher DIR"),
    (["--teacher", "LABELED"], "--teacher is used by --agree-keep or --self-train"),
    (["--teacher", "LABELED", "--agree-keep", "1.5"], "--agree-keep must be in (0, 1]"),
])
def test_cli_teacher_options_are_checked_in_one_line(sets, tmp_path, capsys, args, message):
    from handsoff.cli import main

    out = tmp_path / "r.json"
    args = [str(sets["labeled"]) if a == "LABELED" else a for a in args]
    code = main(["bench", "--train", str(sets["labeled"]), "--test", str(sets["test"]), "--task", "seg",
                 "--out", str(out), "--steps", "1", "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and message in err, err
    assert not out.exists()
