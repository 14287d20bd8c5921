"""The generation engine on a tiny generator and a fake labeler (tests/test_synth_fakes.py)."""
from __future__ import annotations

import errno
import json
import threading
import time

import numpy as np
import pytest
import torch

import handsoff.synth.engine as engine
from handsoff.data import ShardDataset
from handsoff.data.shards import read_manifest, read_shard
from handsoff.errors import HandsoffError
from handsoff.gan.sampling import z_from_seeds
from handsoff.synth.engine import (GenerateResult, LabelerInfo, filter_mask, generate_corpus, plan_shards,
                                   wanted_indices)
from handsoff.synth.lock import corpus_lock
from handsoff.synth.sampling import candidate_seed
from handsoff.synth.settings import GenerateSettings
from handsoff.synth.writer import BackgroundWriter
from handsoff.utils.images import to_uint8
from test_synth_fakes import FAKE_INFO, fake_label_fn, tiny_generator


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Bytes depend on the torch thread count: compare runs made with the same (one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def G():
    return tiny_generator()


def run(G, out, progress=False, batch=8, label_fn=None, info=FAKE_INFO, around=None, **settings) -> GenerateResult:
    settings = {"n": 24, "shard_size": 10, **settings}
    return generate_corpus(G, label_fn or fake_label_fn(G), info, out, GenerateSettings(**settings), batch=batch,
                           around=around, progress=progress)


def corpus_bytes(folder) -> dict[str, bytes]:
    """The files that make up a corpus (report.json carries timings and is left out)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.name.startswith("shard-") or p.name == "manifest.json"}


# --------------------------------------------------------------------------------------------- units

def test_plan_shards():
    assert [(p.shard, p.start, p.stop) for p in plan_shards(25, 10)] == [(0, 0, 10), (1, 10, 20), (2, 20, 25)]
    assert len(plan_shards(10, 10)) == 1


def test_filter_mask_drops_the_most_uncertain():
    u = np.array([0.1, 0.9, 0.5, np.nan, 0.9, 0.2], np.float32)
    assert filter_mask(u, 0.0).all()
    assert filter_mask(u, 0.34).tolist() == [True, False, True, False, True, True]  # floor(0.34 * 6) = 2
    assert filter_mask(u, 0.5).tolist() == [True, False, True, False, False, True]
    assert (~filter_mask(np.zeros(100, np.float32), 0.29)).sum() == 29  # 0.29 * 100 = 28.999... in floats


def test_wanted_indices_spread():
    assert wanted_indices(np.arange(6), 0.5).tolist() == [False, True, False, True, False, True]
    assert wanted_indices(np.arange(4), 1.0).all()
    assert wanted_indices(np.arange(1000), 0.25).sum() == 250


def test_candidate_seeds():
    assert candidate_seed(7, 3, 0) == 10
    again = candidate_seed(7, 3, 1)
    assert again == candidate_seed(7, 3, 1) and again != candidate_seed(7, 4, 1) and 0 <= again < 2**32


def test_settings_are_validated(G, tmp_path):
    for bad in ({"n": 0}, {"filter": 1.0}, {"shard_size": 0}, {"seed": 2**32 - 5, "n": 10}, {"mix_from": 2}):
        with pytest.raises(HandsoffError, match="generate:"):
            run(G, tmp_path / "x", **bad)
    with pytest.raises(HandsoffError, match="--want-class 'ears' is not a class"):
        run(G, tmp_path / "x", want_class="ears")
    assert not (tmp_path / "x").exists()


def test_background_writer_overlaps_and_propagates_errors():
    done = []

    def slow(item):
        time.sleep(0.05)
        done.append((item, threading.current_thread().name))

    with BackgroundWriter(slow, maxsize=1) as writer:
        for i in range(3):
            writer.put(i)
    assert [d[0] for d in done] == [0, 1, 2] and all(d[1] == "handsoff-writer" for d in done)

    def fail(item):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        with BackgroundWriter(fail) as writer:
            for i in range(10):
                writer.put(i)


# --------------------------------------------------------------------------------------------- runs

def test_generate_counts_seeds_and_labels(G, tmp_path):
    result = run(G, tmp_path / "c", filter=0.2)
    manifest = result.manifest
    assert manifest.complete and [e.generated for e in manifest.shards] == [10, 10, 4]
    assert [e.kept for e in manifest.shards] == [8, 8, 4]  # floor(0.2 * 4) = 0 in the last shard
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["generated"] == 24 and report["kept"] == 20 and report["dropped"] == 4
    assert report["filtered_fraction"] == pytest.approx(4 / 24, abs=1e-6) and report["samples_per_s"] > 0
    assert report["generator_digest"] == manifest.identity["generator_digest"]
    assert report["labeler_digest"] == "fake-labeler-1"
    assert (tmp_path / "c" / "preview.png").stat().st_size > 0

    rec, attrs = read_shard(tmp_path / "c" / "shard-00000.h5")
    assert attrs["indices"] == [0, 10] and attrs["generated"] == 10 and attrs["kept"] == 8
    assert np.array_equal(rec.seeds, rec.index) and list(rec.index) == sorted(rec.index)  # seed 0 + i, in order
    dropped = sorted(set(range(10)) - set(rec.index.tolist()))
    # What the labeler says about seeds 0-9, computed again from the seeds alone:
    with torch.no_grad():
        images = to_uint8(G.synthesis(G.mapping(z_from_seeds(list(range(10)), G.z_dim), truncation_psi=0.7)))
    scores = images.astype(np.float32).mean(-1).reshape(10, -1).std(1) / 255
    assert set(dropped) == set(np.argsort(-scores)[:2].tolist())  # the two most uncertain
    assert np.abs(rec.images.astype(int) - images[rec.index].astype(int)).max() <= 1

    ds = ShardDataset(tmp_path / "c")
    assert len(ds) == 20 and int(ds[0]["seed"]) == int(rec.seeds[0])


def test_rerunning_a_lost_shard_gives_identical_bytes_and_skips_the_rest(G, tmp_path):
    out = tmp_path / "c"
    run(G, out)
    before = corpus_bytes(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.h5")}
    (out / "shard-00001.h5").unlink()
    (out / "shard-00002.h5").write_bytes(b"corrupted")  # fails its sha256: made again
    result = run(G, out)
    assert corpus_bytes(out) == before
    assert (out / "shard-00000.h5").stat().st_mtime_ns == mtimes["shard-00000.h5"]  # skipped
    assert result.report["this_run"]["shards_written"] == 2 and result.report["this_run"]["shards_skipped"] == 1


def test_batch_size_does_not_change_which_samples(G, tmp_path):
    a = run(G, tmp_path / "a", batch=8).manifest
    b = run(G, tmp_path / "b", batch=3).manifest
    assert [e.kept for e in a.shards] == [e.kept for e in b.shards]
    assert a.identity == b.identity  # batch is a compute setting, not part of the corpus


def test_other_settings_are_refused(G, tmp_path):
    out = tmp_path / "c"
    run(G, out)
    with pytest.raises(HandsoffError) as err:
        run(G, out, truncation=0.5)
    message = str(err.value)
    assert "manifest.json" in message and "truncation 0.7 there, 0.5 now" in message and "\n" not in message
    with pytest.raises(HandsoffError, match="labeler_digest"):
        run(G, out, info=LabelerInfo(FAKE_INFO.classes, FAKE_INFO.keypoint_names, True, "another"))


def test_a_second_run_into_the_same_folder_is_refused(G, tmp_path):
    out = tmp_path / "c"
    with corpus_lock(out):
        with pytest.raises(HandsoffError, match="another run is writing this corpus"):
            run(G, out)
    run(G, out)  # the lock is gone with its holder


def disk_full_at_shard_1(monkeypatch) -> None:
    """Make the engine's shard writer fail with ENOSPC on shard-00001.h5 (the others are written)."""
    real_write = engine.write_shard

    def write_until_full(path, *args, **kwargs):
        if path.name == "shard-00001.h5":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(engine, "write_shard", write_until_full)


def test_full_disk_is_a_clear_error_and_finished_shards_survive(G, tmp_path, monkeypatch):
    out = tmp_path / "c"
    reference = tmp_path / "ref"
    run(G, reference)
    disk_full_at_shard_1(monkeypatch)
    with pytest.raises(HandsoffError) as err:
        run(G, out)
    assert "shard-00001.h5: cannot write the shard (No space left on device)" in str(err.value)
    manifest = read_manifest(out)
    assert [e.shard for e in manifest.shards] == [0] and not manifest.complete
    assert (out / "shard-00000.h5").read_bytes() == (reference / "shard-00000.h5").read_bytes()
    assert not list(out.glob(".*.tmp"))
    monkeypatch.undo()
    run(G, out)
    assert corpus_bytes(out) == corpus_bytes(reference)


def _make_read_only(folder):
    """chmod a-w; as root (where mode bits do not bind) the immutable attribute instead."""
    import os
    import subprocess

    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            folder.chmod(0o755)
            pytest.skip("cannot make a folder read-only here (root without chattr)")
        return lambda: (subprocess.run(["chattr", "-i", str(folder)], check=True), folder.chmod(0o755))
    return lambda: folder.chmod(0o755)


def test_read_only_folder_is_a_clear_error(G, tmp_path, monkeypatch):
    out = tmp_path / "c"
    disk_full_at_shard_1(monkeypatch)  # leaves a corpus with one finished shard
    with pytest.raises(HandsoffError):
        run(G, out)
    monkeypatch.undo()
    finished = corpus_bytes(out)
    undo = _make_read_only(out)
    try:
        with pytest.raises(HandsoffError) as err:
            run(G, out)
    finally:
        undo()
    assert str(out) in str(err.value) and "cannot write" in str(err.value) and "\n" not in str(err.value)
    assert corpus_bytes(out) == finished
    fresh = tmp_path / "ro" / "new"
    fresh.parent.mkdir()
    undo = _make_read_only(fresh.parent)
    try:
        with pytest.raises(HandsoffError, match="cannot write here"):
            run(G, fresh)
    finally:
        undo()


def test_keep_all_stores_the_verdict(G, tmp_path):
    result = run(G, tmp_path / "c", keep_all=True, filter=0.3)
    assert result.manifest.kept == 24 and result.report["dropped"] == 0 and result.report["flagged_uncertain"] == 7
    rec, _ = read_shard(tmp_path / "c" / "shard-00000.h5")
    assert len(rec) == 10 and (~rec.keep).sum() == 3
    assert rec.uncertainty[~rec.keep].min() >= rec.uncertainty[rec.keep].max()


def test_want_class_oversamples_deterministically(G, tmp_path):
    # About a quarter of the tiny generator's samples have 40 'dark' pixels (fake labeler).
    kwargs = dict(n=20, shard_size=20, want_class="dark", want_pixels=40, want_ratio=0.5, want_tries=6, filter=0.0)
    result = run(G, tmp_path / "a", **kwargs)
    want = result.report["want_class"]
    assert want["indices"] == 10 and want["candidates"] >= 10 and 0 < want["acceptance_rate"] <= 1
    rec, _ = read_shard(tmp_path / "a" / "shard-00000.h5")
    wanted = wanted_indices(rec.index, 0.5)
    holds = (rec.seg == 1).sum(axis=(1, 2)) >= 40
    assert holds[wanted].sum() == want["accepted"]
    assert (rec.seeds[~wanted] == rec.index[~wanted]).all()  # the others keep seed S + i
    retried = rec.seeds != rec.index
    assert retried.any() and holds[retried].mean() > holds[~wanted].mean()
    run(G, tmp_path / "b", **kwargs)
    assert corpus_bytes(tmp_path / "a") == corpus_bytes(tmp_path / "b")


def test_around_mixes_fine_layers_only(G, tmp_path):
    base = torch.randn(3, G.num_ws, G.w_dim)
    result = run(G, tmp_path / "a", around=base, n=7, shard_size=7, filter=0.0, store_ws=True, mix_noise=0.1)
    cut = G.num_ws // 2
    assert result.manifest.identity["settings"]["mix_from"] == cut and result.manifest.identity["around_digest"]
    rec, _ = read_shard(tmp_path / "a" / "shard-00000.h5")
    np.testing.assert_array_equal(rec.ws[:, :cut], base[rec.index % 3, :cut].numpy())
    assert not np.allclose(rec.ws[:, cut:], base[rec.index % 3, cut:].numpy())
    assert not np.allclose(rec.ws[0, cut:], rec.ws[3, cut:])  # same base image, other seed
    run(G, tmp_path / "b", around=base, n=7, shard_size=7, filter=0.0, store_ws=True, mix_noise=0.1)
    assert corpus_bytes(tmp_path / "a") == corpus_bytes(tmp_path / "b")
    with pytest.raises(HandsoffError, match="around_digest"):
        run(G, tmp_path / "a", around=base + 1, n=7, shard_size=7, filter=0.0, store_ws=True, mix_noise=0.1)
