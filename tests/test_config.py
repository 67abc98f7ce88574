"""parse_layers, BaseConfig's refusals and YAML loading, and the shipped job configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tourray.capture import CaptureConfig
from tourray.config import parse_layers
from tourray.errors import UserError

REPO = Path(__file__).resolve().parent.parent
REQUIRED = dict(model="m", samples="s", run="r")


@pytest.mark.parametrize("spec,want", [
    ("all", [-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
    ("blocks", list(range(12))),
    ("embed,0,5,10-11", [-1, 0, 5, 10, 11]),
    (" Embed , 3-5 ,4 ", [-1, 3, 4, 5]),   # case, spaces and overlaps: sorted unique
    ("none", []),
])
def test_parse_layers_valid(spec, want):
    assert parse_layers(spec, 12) == want


def test_parse_layers_spec_from_help():
    assert parse_layers("embed,0,5,10-20", 24) == [-1, 0, 5] + list(range(10, 21))


@pytest.mark.parametrize("spec,item", [
    ("0,12", "12"),        # one past the last block
    ("10-20", "10-20"),    # range running past the end
    ("5-3", "5-3"),        # reversed range
    ("-1", "-1"),          # the embedding is spelled 'embed'
    ("0,x", "x"),
    ("1-2-3", "1-2-3"),
    ("0,,1", ""),
    ("1-", "1-"),          # an open range is not a layer
])
def test_parse_layers_refusals_name_flag_and_item(spec, item):
    with pytest.raises(UserError) as e:
        parse_layers(spec, 12)
    assert "--layers" in str(e.value) and repr(item) in str(e.value)


def test_unknown_key_is_refused_and_named():
    with pytest.raises(UserError, match="bogus"):
        CaptureConfig.parse(REQUIRED | {"bogus": 1})


def test_yaml_typo_is_named_as_written(tmp_path):
    # a YAML key is spelled with underscores: the message must name it as the file spells it
    f = tmp_path / "c.yaml"
    f.write_text("model: m\nsamples: s\nrun: r\nmax_lenght: 10\n")
    with pytest.raises(UserError) as e:
        CaptureConfig.from_yaml(f)
    assert str(f) in str(e.value) and "max_lenght" in str(e.value)


def test_invalid_values_are_one_user_error_naming_each_field():
    with pytest.raises(UserError) as e:
        CaptureConfig.parse(REQUIRED | {"store_dtype": "int8", "group_size": 0})
    msg = str(e.value)
    assert "store-dtype" in msg and "group-size" in msg and "CaptureConfig" in msg


def test_from_yaml_flags_override_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: m\nsamples: s\nrun: fromfile\nlayers: embed,0\nstore_dtype: bfloat16\nsites: resid_mid,resid_post\n")
    cfg = CaptureConfig.from_yaml(f, run="fromflag", layers="none")
    assert (cfg.run, cfg.layers) == ("fromflag", "none")
    assert cfg.store_dtype.value == "bfloat16"
    assert [s.value for s in cfg.sites] == ["resid_post", "resid_mid"]  # parsed and put in Site order


def test_from_yaml_refuses_unreadable_and_non_mapping(tmp_path):
    with pytest.raises(UserError, match="cannot read config"):
        CaptureConfig.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        CaptureConfig.from_yaml(tmp_path / "list.yaml")


def test_from_yaml_refuses_a_key_given_twice(tmp_path):
    """YAML keeps the last of two equal keys silently; a job file with two `qa:` sections ran the wrong one."""
    from tourray.recipes import DemoConfig

    f = tmp_path / "job.yaml"
    f.write_text("capture: {model: m, samples: s, run: r}\nqa: {model: m, run: a}\nqa: {model: m, run: b}\n")
    with pytest.raises(UserError, match=r"job.yaml: line 3: key 'qa' appears twice"):
        DemoConfig.from_yaml(f)
    (tmp_path / "flat.yaml").write_text("model: m\nsamples: s\nrun: r\nrun: q\n")
    with pytest.raises(UserError, match="key 'run' appears twice"):
        CaptureConfig.from_yaml(tmp_path / "flat.yaml")


def test_shipped_job_configs_validate():
    """Every YAML in jobs/configs validates: a flat file as a CaptureConfig, a sectioned job file
    (demo.yaml: demo_model / capture / reports, read by jobs/demo.py) as a DemoConfig."""
    from tourray.recipes import DemoConfig, HealJobConfig

    folder = REPO / "jobs" / "configs"
    if not folder.exists():
        return
    files = sorted(folder.glob("*.yaml"))
    assert {"capture.yaml", "demo.yaml", "prune_sweep.yaml"} <= {f.name for f in files}
    for f in files:
        data = yaml.safe_load(f.read_text())
        if "steps" in data:  # `tourray compress --config`: the rounds read a teacher run and an evidence run
            from tourray.heal.config import CompressConfig

            c = CompressConfig.from_yaml(f)
            assert c.model and c.samples and c.teacher_run, f
            continue
        if "study" in data:  # jobs/heal.py: the heal study reads the teacher run of its own lake
            job = HealJobConfig.from_yaml(f)
            cfg = job.capture
            assert job.teacher.logits and job.teacher.lake == cfg.lake == job.study.lake, f
            assert job.study.teacher_run == job.teacher.run and job.study.run == cfg.run, f
        elif "capture" in data:
            job = DemoConfig.from_yaml(f)
            cfg = job.capture
            if job.sweep is not None:  # the sweep judges what the capture section captured
                assert job.sweep.run == cfg.run and job.sweep.lake == cfg.lake, f
        else:
            cfg = CaptureConfig.from_yaml(f)
        assert cfg.run and cfg.model and cfg.samples, f


def test_capture_help_example_config_loads(monkeypatch):
    """`tourray capture --help` shows `--config jobs/configs/demo.yaml ...`: that must parse."""
    from tourray import cli
    from tourray.capture import commands

    monkeypatch.chdir(REPO)  # the example is written relative to the repository root
    line = next(x for x in commands.EXAMPLES.splitlines() if "--config" in x)
    argv = line.split()[1:]  # drop the program name
    assert argv[argv.index("--config") + 1].startswith("jobs/configs/")
    args = cli.parser().parse_args(argv)
    from tourray.config import config_from_args

    cfg = config_from_args(CaptureConfig, args)  # what cmd_capture does first
    assert cfg.layers == "embed,0-3" and cfg.store_dtype.value == "float32"


def test_a_checkpoint_named_relative_or_absolute_is_one_model(tmp_path, monkeypatch):
    """Resuming a run with its model folder spelled absolutely (a sweep's Ray tasks do) is no change."""
    import json

    from tourray.lake.runs import IDENTITY, run_changes

    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    manifest = json.dumps({"config": {}, "prompt": {}, "samples": {}})
    old = {k: 0 for k in IDENTITY} | {"model": "ckpt", "tokenizer": "ckpt", "manifest": manifest}
    assert run_changes(old, old | {"model": str(tmp_path / "ckpt"), "tokenizer": str(tmp_path / "ckpt")}, {}, {}) == []
    assert run_changes(old, old | {"model": str(tmp_path / "other")}, {}, {}) == [
        f"model: 'ckpt' in the lake, '{tmp_path / 'other'}' now"]


def test_storage_options_never_reach_dumps_or_reprs():
    """A dump is what the run manifest stores and the CLI logs: credentials must not be in it."""
    import pickle

    c = CaptureConfig(model="m", samples="s", run="r", storage_options="aws_secret_access_key=SECRET,allow_http=true")
    assert c.storage_options == {"aws_secret_access_key": "SECRET", "allow_http": "true"}
    assert "SECRET" not in str(c.model_dump(mode="json")) and "SECRET" not in repr(c)
    assert pickle.loads(pickle.dumps(c)).storage_options == c.storage_options  # actors still get them
