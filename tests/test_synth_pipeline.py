"""``handsoff run``: the config file and the stage-skipping logic (with fake stages)."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from handsoff.errors import HandsoffError
from handsoff.synth.pipeline import config_from_dict, dump_toml, load_config
from handsoff.synth.stages import Stage, is_current, path_digest, run_stages, stamp_path


class FakePipeline:
    """input.txt -> a.txt (upper-cased) -> b/ (a folder with a.txt reversed), counting runs."""

    def __init__(self, root: Path, setting: int = 1) -> None:
        self.root, self.setting, self.calls = root, setting, []
        self.source = root / "input.txt"
        self.a, self.b = root / "a.txt", root / "b"

    def make_a(self) -> None:
        self.calls.append("a")
        self.a.write_text(self.source.read_text().upper() * self.setting)

    def make_b(self) -> None:
        self.calls.append("b")
        self.b.mkdir()
        (self.b / "out.txt").write_text(self.a.read_text()[::-1])

    def stages(self) -> list[Stage]:
        return [Stage("a", self.a, self.make_a, inputs={"source": self.source}, settings={"times": self.setting}),
                Stage("b", self.b, self.make_b, inputs={"a": self.a}, done=lambda: (self.b / "out.txt").exists())]

    def run(self) -> list[str]:
        self.calls = []
        ran = run_stages(self.stages(), log=lambda _: None)
        assert ran == self.calls
        return ran


def test_stages_run_once_then_skip(tmp_path):
    p = FakePipeline(tmp_path)
    p.source.write_text("abc")
    assert p.run() == ["a", "b"]
    assert p.run() == []
    stamp = json.loads(stamp_path(p.a).read_text())
    assert stamp["stage"] == "a" and stamp["settings"] == {"times": 1}
    assert stamp["inputs"]["source"] == path_digest(p.source)
    assert all(is_current(s) for s in p.stages())


def test_changed_input_reruns_the_stage_and_what_reads_its_output(tmp_path):
    p = FakePipeline(tmp_path)
    p.source.write_text("abc")
    p.run()
    p.source.write_text("abd")
    assert p.run() == ["a", "b"]  # the stale folder b/ was removed, then made again
    assert (p.b / "out.txt").read_text() == "DBA"
    p.source.write_text("abd")  # same content, new mtime: nothing to do
    assert p.run() == []


def test_unchanged_output_does_not_rerun_later_stages(tmp_path):
    p = FakePipeline(tmp_path)
    p.source.write_text("abc")
    p.run()
    stamp_path(p.a).unlink()  # 'a' must run again, but it makes the same bytes
    assert p.run() == ["a"]


def test_changed_settings_missing_output_and_failed_stage(tmp_path):
    p = FakePipeline(tmp_path)
    p.source.write_text("abc")
    p.run()
    p.setting = 2
    assert p.run() == ["a", "b"]
    (p.b / "out.txt").unlink()  # incomplete output ('done' fails)
    assert p.run() == ["b"]

    def broken() -> None:
        p.calls.append("a")
        raise RuntimeError("crash")

    p.setting = 3
    stages = p.stages()
    stages[0].run = broken
    with pytest.raises(RuntimeError):
        run_stages(stages, log=lambda _: None)
    assert not stamp_path(p.a).exists()  # no stamp for a stage that did not finish
    assert p.run() == ["a", "b"]


def test_folder_digest_ignores_hidden_files_and_stamps(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("1")
    before = path_digest(tmp_path / "d")
    (tmp_path / "d" / ".lock").write_text("pid 1")
    (tmp_path / "d" / "y.stamp.json").write_text("{}")
    assert path_digest(tmp_path / "d") == before
    (tmp_path / "d" / "x.txt").write_text("2")
    assert path_digest(tmp_path / "d") != before
    assert path_digest(tmp_path / "nothing") == "missing"


CONFIG = """
out = "run"
generator = "g.safetensors"
[labeled]
path = "my_set"
[encoder]
path = "/abs/encoder.safetensors"
[invert]
refine_steps = 5
[labeler]
ensemble = 2
[generate]
n = 100
batch = 4
"""


def test_config_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "p.toml").write_text(CONFIG)
    config = load_config(tmp_path / "cfg" / "p.toml")
    assert config.out == tmp_path / "cfg" / "run" and config.labeled == tmp_path / "cfg" / "my_set"
    assert config.generator == tmp_path / "cfg" / "g.safetensors" and config.encoder == Path("/abs/encoder.safetensors")
    assert config.render is None and config.invert == {"refine_steps": 5} and config.generate == {"n": 100, "batch": 4}


@pytest.mark.parametrize("text, message", [
    ('out = "x"\nbogus = 1\n[labeled]\npath = "y"', "unknown setting 'bogus'"),
    ('[labeled]\npath = "y"', "needs 'out'"),
    ('out = "x"\n[labeled]\npath = "y"\n[labeled.render]\nn = 4\nsize = 16', "exactly one of 'path'"),
    ('out = "x"\n[labeled]\npath = "y"\n[encoder]\npath = "e"\nsteps = 3', "give one or the other"),
    ('out = "x"\n[labeled\n', "not valid TOML"),
])
def test_bad_configs_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(HandsoffError, match=message) as err:
        load_config(tmp_path / "p.toml")
    assert "\n" not in str(err.value) and "p.toml" in str(err.value)


def test_unknown_generate_setting_names_the_known_ones(tmp_path):
    from handsoff.synth.pipeline import _generate_stage, _Paths

    text = CONFIG.replace("batch = 4", "batch = 4\nfilterr = 0.2")
    config = config_from_dict(tomllib.loads(text), tmp_path, "p.toml")
    with pytest.raises(HandsoffError, match=r"\[generate\] has no setting 'filterr' \(known: .*filter"):
        _generate_stage(config, _Paths.of(config), progress=False)


def test_dump_toml_round_trips():
    data = {"out": "x", "device": "cpu", "labeled": {"render": {"domain": "heads", "n": 16, "size": 64}},
            "labeler": {"hidden": [256, 32], "lr": 0.001, "tasks": ["seg"]}, "generate": {"keep_all": True},
            "invert": {}}
    assert tomllib.loads(dump_toml(data)) == data
