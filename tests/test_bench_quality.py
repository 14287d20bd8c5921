"""The quality study's bookkeeping (aggregation, the claim, the markdown), the headroom check and
benchmarks/summarize.py."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


quality = _load("quality")
summarize = _load("summarize")
headroom = _load("headroom")


def _run(arm, n, draw, task, value):
    metric = {"seg": "miou", "keypoints": "pck@0.05", "depth": "rmse"}[task]
    return {"task": task, "extra": {"arm": arm, "labeled": n, "draw": draw}, "metrics": {metric: value},
            "primary_metric": {"name": metric, "value": value}, "train_size": 10, "supervised_fraction": 1.0}


def test_claim_uses_the_gap_and_the_metric_direction():
    settings = quality.Settings(sizes=(16,), draws=2, arms=("baseline", "handsoff", "handsoff-filtered", "oracle"),
                                tasks=("seg", "depth"))
    values = {  # seg: higher is better; depth RMSE: lower is better
        ("seg", "baseline"): [0.40, 0.42], ("seg", "handsoff"): [0.47, 0.49],
        ("seg", "handsoff-filtered"): [0.43, 0.43], ("seg", "oracle"): [0.51, 0.53],
        ("depth", "baseline"): [1.0, 1.2], ("depth", "handsoff"): [0.8, 0.8],
        ("depth", "handsoff-filtered"): [1.3, 1.3], ("depth", "oracle"): [0.5, 0.7],
    }
    runs = [_run(arm, None if arm == "oracle" else 16, d, task, v[d])
            for (task, arm), v in values.items() for d in (0, 1)]
    table = quality.aggregate(runs, settings)
    assert table["seg"]["baseline"]["16"]["primary"]["mean"] == pytest.approx(0.41)
    assert table["seg"]["baseline"]["16"]["primary"]["std"] == pytest.approx(0.0141421, rel=1e-4)
    verdicts = quality.claims(table, settings)
    seg = verdicts["seg"]["handsoff"]["by_labeled"]["16"]
    assert seg["gap_closed"] == pytest.approx((0.48 - 0.41) / (0.52 - 0.41)) and verdicts["seg"]["handsoff"]["holds"]
    assert not verdicts["seg"]["handsoff-filtered"]["holds"]  # beats the baseline but closes 18% of the gap
    depth = verdicts["depth"]["handsoff"]["by_labeled"]["16"]
    assert depth["beats_baseline"] and depth["gap_closed"] == pytest.approx(0.3 / 0.5)
    assert not verdicts["depth"]["handsoff-filtered"]["by_labeled"]["16"]["beats_baseline"]
    text = quality.markdown(table, verdicts, settings)
    assert "| handsoff | 0.480 ± 0.014 |" in text and "claim holds" in text and "does NOT hold" in text


def test_missing_arms_do_not_count_as_holding():
    settings = quality.Settings(sizes=(16,), draws=1, arms=("baseline", "oracle"), tasks=("seg",))
    runs = [_run("baseline", 16, 0, "seg", 0.4), _run("oracle", None, 0, "seg", 0.5)]
    verdicts = quality.claims(quality.aggregate(runs, settings), settings)
    assert verdicts["seg"]["handsoff"] == {"holds": False, "by_labeled": {"16": {"missing": ["handsoff"]}}}


def test_without_a_gap_the_claim_is_beating_the_baseline():
    settings = quality.Settings(sizes=(16, 50), draws=1, arms=("baseline", "handsoff", "oracle"), tasks=("seg",))
    runs = [_run("baseline", 16, 0, "seg", 0.40), _run("handsoff", 16, 0, "seg", 0.45),
            _run("baseline", 50, 0, "seg", 0.52), _run("handsoff", 50, 0, "seg", 0.53),
            _run("oracle", None, 0, "seg", 0.50)]
    verdict = quality.claims(quality.aggregate(runs, settings), settings)["seg"]["handsoff"]
    assert verdict["by_labeled"]["50"]["gap_closed"] is None and verdict["by_labeled"]["50"]["holds"]
    assert verdict["by_labeled"]["16"]["gap_closed"] == pytest.approx(0.5) and verdict["holds"]


def test_rereport_rejudges_a_recorded_study_and_names_a_bad_file(tmp_path):
    settings = quality.Settings(sizes=(16,), draws=1, arms=("baseline", "handsoff", "oracle"), tasks=("seg",))
    runs = [_run("baseline", 16, 0, "seg", 0.5), _run("handsoff", 16, 0, "seg", 0.55),
            _run("oracle", None, 0, "seg", 0.45)]
    record = {"settings": quality.asdict(settings), "table": quality.aggregate(runs, settings),
              "ablations_vs_handsoff": {}, "diagnosis": None, "claims": "stale", "markdown": "stale",
              "runs": [{"arm": r["extra"]["arm"], "task": r["task"], "warnings": []} for r in runs]}
    path = tmp_path / "quality.json"
    path.write_text(quality.json.dumps(record))
    text = quality.rereport(path)
    saved = quality.json.loads(path.read_text())
    assert saved["claims"]["seg"]["handsoff"]["holds"] and saved["markdown"] == text and "no gap to close" in text
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(quality.HandsoffError, match="bad.json: not a quality study results file"):
        quality.rereport(bad)


def test_ablations_run_at_their_own_sizes():
    settings = quality.Settings(sizes=(16, 50), ablation_sizes=(16,), ablation_draws=2, draws=3,
                                arms=("baseline", "handsoff", "no-refine", "oracle"), tasks=("seg",))
    todo = quality.cells(settings)
    assert [c for c in todo if c[0] == "no-refine"] == [("no-refine", 16, 0), ("no-refine", 16, 1)]
    assert [c for c in todo if c[0] == "oracle"] == [("oracle", None, 0), ("oracle", None, 1), ("oracle", None, 2)]
    assert len([c for c in todo if c[0] == "baseline"]) == 6

    runs = [_run("handsoff", 16, d, "seg", 0.5 + d / 10) for d in range(3)]
    runs += [_run("no-refine", 16, d, "seg", 0.45 + d / 10) for d in range(2)]
    deltas = quality.ablation_deltas(runs, settings)
    assert deltas["seg"]["no-refine"]["16"] == {"mean": pytest.approx(-0.05), "draws": 2}
    assert "| no-refine | -0.050 (2 draws) |" in quality.ablation_markdown(deltas, settings)


def test_summary_regenerates_only_its_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# B\n\nprose\n\n{summarize.BEGIN}\nold figures\n{summarize.END}\n\ntail\n")
    results = tmp_path / "results"
    results.mkdir()
    (results / "domain-cpu.json").write_text(
        '{"device": "cpu: X", "date": "2026-01-02T00:00:00", "target_64": 500,'
        ' "img_per_s": {"64": {"threads=1": {"best": 400.0}, "processes=2": {"best": 600.0}}}}')
    (results / "mystery-cpu.json").write_text('{"device": "cpu: X", "date": "2026-01-02"}')
    text = summarize.update(readme, summarize.render(results))
    assert text.startswith("# B\n\nprose\n") and text.endswith("\n\ntail\n") and "old figures" not in text
    row = "| domain | heads 64px, processes=2 | 600 labeled img/s | 1 thread 400 img/s | 1.50 | cpu: X | 2026-01-02 |"
    assert row in text
    assert "| mystery | mystery-cpu.json | no summary for this benchmark yet |" in text


def test_groups_share_a_corpus_and_nothing_else():
    settings = quality.Settings(sizes=(16, 50), ablation_sizes=(16,), ablation_draws=1, draws=2,
                                arms=("baseline", "handsoff", "handsoff-filtered", "no-refine", "oracle"),
                                tasks=("seg",))
    groups = quality.units(quality.cells(settings))
    assert sorted(c for g in groups for c in g) == sorted(quality.cells(settings))  # every cell, once
    by_cell = {c: g for g in groups for c in g}
    # handsoff and its filtered arm read one corpus, so one process makes it and trains both
    assert by_cell[("handsoff", 50, 1)] == (("handsoff", 50, 1), ("handsoff-filtered", 50, 1))
    assert by_cell[("no-refine", 16, 0)] == (("no-refine", 16, 0),)
    assert by_cell[("baseline", 16, 0)] == (("baseline", 16, 0),)
    # corpus groups first, those with more labeled images (a longer inversion) before the rest
    kinds = [g[0][0] for g in groups]
    assert kinds[:2] == ["handsoff", "handsoff"] and groups[0][0][1] == 50
    assert set(kinds[-6:]) == {"baseline", "oracle"} and "baseline" not in kinds[:-6]  # 4 baselines, 2 oracles


def test_limits_name_lost_classes_and_keypoint_coverage():
    settings = quality.Settings(sizes=(16,), draws=1, arms=("baseline", "handsoff", "oracle"), tasks=("seg",))
    draw = {f"inversion_{w}": {"lpips": 0.2, "psnr": 18.0} for w in ("labeled", "heldout")}
    draw["labeler_on_labeled"] = {"seg": {"miou": 0.7, "per_class_iou": {"skin": 0.9, "eye": 0.5, "ear": 0.05}}}
    draw["labeler_on_heldout"] = {"seg": {"miou": 0.3, "per_class_iou": {"skin": 0.6, "eye": 0.01, "ear": 0.02}}}
    table = {"seg": {"baseline": {"16": {"primary": {"mean": 0.4}}}},
             "keypoints": {"baseline": {"16": {"supervised_fraction": 0.8}},
                           "handsoff": {"16": {"supervised_fraction": 0.25}}}}
    lines = quality.limits({"by_draw": {"n16-d0": draw}}, table, settings)
    assert "- seg classes lost on inverted held-out images (IoU on the labeler's own images -> held-out): " \
           "eye 0.50 -> 0.01" in lines  # skin kept, ear never learned: neither is listed
    assert lines[-1] == ("- keypoints trained as visible (confidence >= 0.5): 25% at n=16 of the corpus's points, "
                         "against 80% of the real labeled images' points")


def test_alignment_share_kept_follows_the_metric_direction():
    alignment = _load("alignment")
    assert alignment.kept_share(0.8, 0.2, higher_is_better=True) == pytest.approx(0.25)
    assert alignment.kept_share(0.5, 2.0, higher_is_better=False) == pytest.approx(0.25)  # RMSE 4x worse
    assert alignment.kept_share(0.0, 0.2, higher_is_better=True) is None


def test_summary_reads_an_alignment_record(tmp_path):
    record = {"device": "cpu: test", "date": "2026-12-03", "inversion": {"refine 50": {"lpips": 0.2, "psnr": 18.0}},
              "tasks": {"seg": {"metric": "miou", "real": {"miou": 0.4}, "inverted": {"refine 50": {"miou": 0.1}},
                                "kept": {"refine 50": 0.25}}}}
    path = tmp_path / "alignment-cpu.json"
    path.write_text(summarize.json.dumps(record))
    rows, device, date, _ = summarize.rows_of(path)
    assert [(r.value, r.reference, r.ratio) for r in rows] == [("0.1", "real images 0.4", 0.25)]
    assert "refine 50: LPIPS 0.2, PSNR 18 dB" in rows[0].figure and device == "cpu: test"


def test_combined_arms_train_on_the_main_corpus_with_the_labeled_images(tmp_path, monkeypatch):
    import handsoff.bench.pretrained as pretrained

    settings = quality.Settings(sizes=(16,), draws=1, steps=400, mix=0.25)
    study = quality.Study(settings, tmp_path, quality.torch.device("cpu"), tmp_path / "E", tmp_path / "G", False)
    monkeypatch.setattr(study, "train_set", lambda arm, n, draw: f"{arm}/{n}/{draw}")
    monkeypatch.setattr(pretrained, "find_weights", lambda name: tmp_path / f"{name}.pth")
    mixed = study.arm_training("handsoff-filtered+labeled", 16, 0)
    assert mixed == {"train_sets": ["handsoff-filtered+labeled/16/0", "baseline/16/0"], "mix": 0.25,
                     "pretrained": None}
    tuned = study.arm_training("pretrain-finetune", 16, 0)
    assert tuned["finetune"] == ["baseline/16/0"] and tuned["finetune_steps"] == 100 and "mix" not in tuned
    assert study.arm_training("baseline-pretrained", 16, 0) == {"train_sets": ["baseline/16/0"],
                                                                "pretrained": "vgg16"}
    assert "pretrain-finetune-filtered" in quality.FILTERED_ARMS
    # one process makes a draw's corpus and trains every arm that reads it
    groups = quality.units(quality.cells(quality.replace(settings, arms=quality.ARMS)))
    main = next(g for g in groups if ("handsoff", 16, 0) in g)
    assert {arm for arm, _, _ in main} == {"handsoff", "handsoff-filtered", *quality.COMBINED_ARMS}


def test_rereport_reads_a_study_recorded_before_the_combined_arms(tmp_path):
    settings = quality.Settings(sizes=(16,), draws=1, arms=("baseline", "handsoff", "oracle"), tasks=("seg",))
    runs = [_run("baseline", 16, 0, "seg", 0.5), _run("handsoff", 16, 0, "seg", 0.55),
            _run("oracle", None, 0, "seg", 0.6)]
    old = {k: v for k, v in quality.asdict(settings).items()
           if k not in ("mix", "finetune_steps", "pretrained", "pretrained_blocks")}
    record = {"settings": old, "table": quality.aggregate(runs, settings), "ablations_vs_handsoff": {},
              "diagnosis": None, "runs": [{"arm": r["extra"]["arm"], "task": r["task"], "warnings": []} for r in runs]}
    path = tmp_path / "quality.json"
    path.write_text(quality.json.dumps(record))
    assert "| handsoff | 0.550 |" in quality.rereport(path)


def test_estimate_costs_each_arm_at_its_own_rate(tmp_path):
    settings = quality.Settings(sizes=(16,), draws=1, arms=("baseline", "baseline-pretrained"), tasks=("seg",),
                                steps=100, test_n=10)
    study = quality.Study(settings, tmp_path, quality.torch.device("cpu"), tmp_path / "E", tmp_path / "G", False)
    run = lambda arm, per_step: {"extra": {"arm": arm}, "settings": {"steps": 10, "finetune": None},  # noqa: E731
                                 "wall_time_s": {"train": 10 * per_step, "test": 0.0}, "test": {"size": 10}}
    est = quality.estimate([run("baseline", 0.1), run("baseline-pretrained", 1.0)], study, settings)
    assert est["trainings"] == 2 and est["training_hours"] == pytest.approx((0.1 + 1.0) * 100 / 3600, abs=0.01)
    assert est["seconds_per_step_by_arm"] == {"baseline": 0.1, "baseline-pretrained": 1.0}


# ------------------------------------------------------------------ the headroom check (headroom.py)
PARTS = {"background": 0.9, "eye": 0.35, "nose": 0.5, "mouth": 0.31}
B16, B50 = [0.39, 0.41], [0.445, 0.455]


def _cells(oracle, b16, b50, parts=PARTS):
    cells = {"oracle": {**headroom.cell_stats(oracle), "per_class_iou": parts}}
    cells["baseline-16"], cells["baseline-50"] = headroom.cell_stats(b16), headroom.cell_stats(b50)
    return cells


def test_headroom_needs_the_margin_at_both_sizes_and_the_small_parts():
    # baseline-16: mean 0.40, sd 0.0141 -> oracle 0.50 is +7.1 sd; baseline-50: mean 0.45, sd 0.0071 -> +7.1 sd
    check = headroom.headroom_check(_cells([0.50], B16, B50), "seg")
    assert check["holds"] and check["by_labeled"]["16"]["margin_sd"] == pytest.approx(0.1 / 0.014142, rel=1e-3)
    assert check["parts"]["holds"]
    close = headroom.headroom_check(_cells([0.46], B16, B50), "seg")  # n=16: +4.2 sd, n=50: +1.4 sd
    assert not close["holds"] and close["by_labeled"]["16"]["holds"] and not close["by_labeled"]["50"]["holds"]
    no_eye = headroom.headroom_check(_cells([0.50], B16, B50, {**PARTS, "eye": 0.0}), "seg")
    assert not no_eye["holds"] and not no_eye["parts"]["holds"]


def test_lower_is_better_for_depth_and_parts_only_for_seg():
    check = headroom.headroom_check(_cells([0.6], [1.3, 1.1], [0.80, 0.78]), "depth")
    assert check["holds"] and "parts" not in check  # 0.6 beats 1.2 +- 0.14 and 0.79 +- 0.014 by > 3 sd
    worse = headroom.headroom_check(_cells([0.9], [1.3, 1.1], [0.80, 0.78]), "depth")
    assert worse["by_labeled"]["50"]["margin_sd"] < 0 and not worse["holds"]


def test_one_draw_or_a_missing_arm_never_passes():
    one = headroom.headroom_check(_cells([0.9], [0.1], [0.1, 0.2]), "keypoints")
    assert one["by_labeled"]["16"]["margin_sd"] is None and not one["holds"]
    missing = headroom.headroom_check({"oracle": headroom.cell_stats([0.9])}, "keypoints")
    assert missing["by_labeled"]["50"]["missing"] and not missing["holds"]
    assert headroom.margin_in_sd(0.5, {"mean": 0.4, "sd": 0.0}, True) == math.inf


def test_check_lines_and_config_names():
    lines = headroom.check_lines("unet-16@1200", {"seg": headroom.headroom_check(
        _cells([0.50], B16, B50), "seg")})
    assert lines[0].startswith("- unet-16@1200 seg miou: headroom YES (n=16: oracle 0.500 vs 0.400 ± 0.014 = +7.1 sd")
    assert "oracle parts: eye 0.35, nose 0.50, mouth 0.31" in lines[0]
    assert headroom.parse_config("vgg16-8@600") == headroom.Config("vgg16", 8, 600)
    assert headroom.parse_config("unet-16@1200").pretrained is None
    with pytest.raises(headroom.HandsoffError, match="expected MODEL-WIDTH@STEPS"):
        headroom.parse_config("unet16")
    with pytest.raises(headroom.HandsoffError, match="model must be unet or one of"):
        headroom.parse_config("resnet-8@10")


def test_summary_reads_a_headroom_record(tmp_path):
    cells = _cells([0.50], B16, B50)
    record = {"device": "cpu: test", "date": "2026-12-05", "curve": {"unet-16@1200": {"seg": cells}},
              "checks": {"unet-16@1200": {"seg": headroom.headroom_check(cells, "seg")}}}
    path = tmp_path / "headroom-cpu.json"
    path.write_text(summarize.json.dumps(record))
    rows, device, _, command = summarize.rows_of(path)
    assert [(r.value, r.reference) for r in rows] == [("0.5: n=16 +7.1 sd, n=50 +7.1 sd", "headroom yes")]
    assert "eye 0.35, nose 0.5, mouth 0.31" in rows[0].figure and device == "cpu: test"


def test_the_cheapest_configuration_with_headroom_is_chosen():
    good, bad = _cells([0.50], B16, B50), _cells([0.46], B16, B50)
    for cells, rate in ((good, 0.25), (bad, 0.1)):
        for cell in cells.values():
            cell["cpu_seconds_per_step"] = rate
    table = {"unet-16@1200": {"seg": good}, "unet-8@600": {"seg": bad}}  # the cheaper one has no headroom
    checks = {name: {"seg": headroom.headroom_check(t["seg"], "seg")} for name, t in table.items()}
    chosen = headroom.cheapest_with_headroom(table, checks)
    assert chosen == {"config": "unet-16@1200", "tasks": ["seg"], "cpu_seconds_per_training": 300.0}
    assert headroom.cheapest_with_headroom({"unet-8@600": table["unet-8@600"]},
                                           {"unet-8@600": checks["unet-8@600"]}) is None
