"""Training and scoring downstream models, the `handsoff bench` command, and its input checks (issue 7)."""
import json

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from handsoff.bench.data import filter_by_uncertainty, open_train_set
from handsoff.bench.train import train_and_score
from handsoff.cli import main
from handsoff.data.folder_dataset import LabeledFolderDataset
from handsoff.data.labeled_set import read_labeled_set, render_to_folder
from handsoff.domains import get_domain
from handsoff.errors import HandsoffError

SIZE = 32
TINY = dict(batch=4, base=4, levels=3, progress=False)


@pytest.fixture(scope="module")
def sets(tmp_path_factory, single_torch_thread):
    root = tmp_path_factory.mktemp("bench")
    heads = get_domain("heads")
    paths = {
        "train": render_to_folder(heads, 12, 1, SIZE, root / "train", progress=False),
        "test": render_to_folder(heads, 6, 2, SIZE, root / "test", progress=False),
        "other_size": render_to_folder(heads, 2, 3, 16, root / "other_size", progress=False),
    }
    renamed = render_to_folder(heads, 2, 4, SIZE, root / "renamed", progress=False)
    meta = json.loads((renamed / "meta.json").read_text())
    meta["classes"] = [f"c{i}" for i in range(len(meta["classes"]))]
    (renamed / "meta.json").write_text(json.dumps(meta))
    paths["renamed"] = renamed
    no_kp = render_to_folder(heads, 2, 5, SIZE, root / "no_keypoints", progress=False)
    (no_kp / "keypoints.json").unlink()
    paths["no_keypoints"] = no_kp
    return paths


class FakeShards(Dataset):
    """Items shaped like `ShardDataset`'s: confidence in column 3 of the keypoints, a real seed, uncertainty."""

    def __init__(self, folder, n=10):
        self.source = LabeledFolderDataset(folder)
        self.root, self.n = folder.parent / "fake-corpus", n
        self.classes, self.keypoint_names = self.source.classes, self.source.keypoint_names
        self.resolution = self.source.resolution

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        item = self.source[i % len(self.source)]
        item["keypoints"][:, 2] *= 0.8  # a confidence, not a 0/1 flag
        item["uncertainty"] = torch.tensor(i / self.n, dtype=torch.float32)
        item["seed"] = torch.tensor(1000 + i, dtype=torch.int64)
        return item


def _write_corpus(folder, out, n=8):
    """A real one-shard corpus (handsoff.data.shards) holding the first n images of a labeled folder."""
    from handsoff.data.shards import Manifest, ShardEntry, ShardRecords, write_manifest, write_shard
    from handsoff.utils.io import sha256_file

    ls = read_labeled_set(folder)
    keypoints = ls.keypoints[:n].copy()
    keypoints[..., 2] *= 0.9  # confidences
    records = ShardRecords(images=np.stack(ls.images[:n]), seeds=np.arange(n, dtype=np.int64) + 100,
                           index=np.arange(n, dtype=np.int64), uncertainty=np.linspace(0, 1, n).astype(np.float32),
                           seg=np.stack(ls.seg[:n]), depth=np.stack(ls.depth[:n]).astype(np.float16),
                           keypoints=keypoints)
    out.mkdir()
    shard = write_shard(out / "shard-00000.h5", records, {}, classes=ls.classes, keypoint_names=ls.keypoint_names)
    entry = ShardEntry(shard.name, 0, (0, n), n, n, sha256_file(shard), shard.stat().st_size)
    write_manifest(out, Manifest({}, SIZE, ls.classes, ls.keypoint_names, True, 1, (entry,)))
    return out


def test_real_corpus_filters_and_mixes(sets, tmp_path):
    from handsoff.data.shards import ShardDataset

    corpus = _write_corpus(sets["train"], tmp_path / "corpus")
    assert isinstance(open_train_set(corpus), ShardDataset)
    # Same keys, shapes and dtypes: torch's own ConcatDataset + default collation mix them.
    mixed = ConcatDataset([ShardDataset(corpus), LabeledFolderDataset(sets["train"], augment=True)])
    batch = next(iter(DataLoader(mixed, batch_size=20, shuffle=False)))
    assert batch["image"].shape == (20, 3, SIZE, SIZE) and batch["image"].dtype == torch.uint8
    assert batch["seg"].dtype == torch.int64 and batch["depth"].dtype == torch.float32
    assert batch["keypoints"].shape[1:] == (10, 3) and batch["seed"][:8].min() >= 100 and batch["seed"][8] == -1
    kept = open_train_set(corpus, max_uncertainty_quantile=0.5)
    assert len(kept) == 4 and all(float(kept[i]["uncertainty"]) <= 0.5 for i in range(4))
    out = tmp_path / "r.json"
    code = main(["bench", "--train", str(corpus), "--train", str(sets["train"]), "--test", str(sets["test"]),
                 "--task", "seg", "--max-uncertainty-quantile", "0.5", "--out", str(out), "--steps", "2",
                 "--batch", "4", "--width", "4", "--no-progress"])
    assert code == 0
    record = json.loads(out.read_text())
    assert [(s["kind"], s["size"]) for s in record["train_sets"]] == [("corpus", 4), ("labeled folder", 12)]
    assert record["train_size"] == 16


@pytest.mark.parametrize("task", ["seg", "keypoints", "depth"])
def test_training_reduces_the_loss(sets, task):
    train = LabeledFolderDataset(sets["train"], augment=False)
    result = train_and_score([train], sets["test"], task, steps=60, lr=5e-3, seed=0, **TINY)
    losses = [loss for _, loss in result["loss_curve"]]
    assert len(losses) == 60
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    primary = result["primary_metric"]
    assert primary["value"] == result["metrics"][primary["name"]] and np.isfinite(primary["value"])


def test_training_is_deterministic(sets):
    runs = [train_and_score([open_train_set(sets["train"])], sets["test"], "keypoints", steps=3, seed=7, **TINY)
            for _ in range(2)]
    assert runs[0]["loss_curve"] == runs[1]["loss_curve"] and runs[0]["metrics"] == runs[1]["metrics"]


def test_also_test_scores_the_same_model_and_refuses_other_names(sets):
    train = LabeledFolderDataset(sets["train"], augment=False)
    result = train_and_score([train], sets["test"], "seg", steps=3, seed=1, also_test={"same": sets["test"]}, **TINY)
    assert result["metrics_on"] == {"same": result["metrics"]}  # one model, scored twice on one set
    with pytest.raises(HandsoffError, match="renamed: its class names differ from the test set's"):
        train_and_score([train], sets["test"], "seg", steps=1, also_test={"other": sets["renamed"]}, **TINY)


def test_folder_and_fake_shards_mix(sets):
    folder = LabeledFolderDataset(sets["train"], augment=True)
    shards = filter_by_uncertainty(FakeShards(sets["train"]), 0.5)
    assert len(shards) == 5  # uncertainties 0.0 .. 0.4 of 0.0 .. 0.9
    result = train_and_score([folder, shards], sets["test"], "keypoints", steps=2, **TINY)
    assert result["train_size"] == 12 + 5
    kinds = [(s["kind"], s["size"]) for s in result["train_sets"]]
    assert kinds == [("labeled folder", 12), ("FakeShards", 5)]
    assert result["metrics"].keys() == {"pck@0.05", "pck@0.1"}


def test_unconfident_keypoints_train_nothing_and_say_so(sets):
    class Unsure(FakeShards):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            item["keypoints"][:, 2] = 0.4  # below the 0.5 confidence that counts as visible
            return item

    result = train_and_score([Unsure(sets["train"])], sets["test"], "keypoints", steps=2, **TINY)
    assert result["supervised_fraction"] == 0.0
    assert "no visible keypoint" in result["warnings"][0]


def test_cli_writes_results(sets, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["bench", "--train", str(sets["train"]), "--train", str(sets["train"]), "--test", str(sets["test"]),
                 "--task", "depth", "--out", str(out), "--steps", "2", "--batch", "2", "--width", "4",
                 "--no-progress"])
    assert code == 0
    record = json.loads(out.read_text())
    for key in ("task", "metrics", "settings", "train_sets", "train_size", "test", "wall_time_s", "loss_curve",
                "date", "primary_metric"):
        assert key in record
    assert record["settings"]["steps"] == 2 and record["settings"]["seed"] == 0
    assert record["train_size"] == 24 and record["test"]["size"] == 6
    assert set(record["metrics"]) >= {"rmse", "absrel", "delta1"}
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("case, train, test, task, message", [
    ("missing test", "train", "nowhere", "seg", "nowhere: no such folder"),
    ("task not in test", "train", "no_keypoints", "keypoints", "no_keypoints: the test set has no keypoints"),
    ("other resolution", "other_size", "test", "seg", "other_size: images are 16x16 but the test set's"),
    ("other classes", "renamed", "test", "seg", "renamed: class names"),
    ("missing train", "nowhere", "test", "seg", "nowhere: no such folder"),
])
def test_bad_input_is_one_line_and_writes_nothing(sets, tmp_path, capsys, case, train, test, task, message):
    out = tmp_path / "r.json"
    path = lambda name: str(sets.get(name, tmp_path / name))  # noqa: E731
    code = main(["bench", "--train", path(train), "--test", path(test), "--task", task, "--out", str(out),
                 "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2, case
    assert "\n" not in err and message in err, err
    assert not out.exists() and not list(tmp_path.iterdir())
