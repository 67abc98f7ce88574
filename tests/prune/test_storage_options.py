"""Lance storage options (object-store credentials) on the commands that open a lake beyond capture and
stats: prune plan / apply / width / sweep / verdict, qa and transport. Every config takes the same
field (flag text or YAML mapping), never dumps or shows it, keeps it through the copies a sweep or
QA run hands to its Ray tasks and sub-captures, and opens its lakes with it. (End to end on an s3://
lake: tests/test_s3.py::test_cli_storage_options_only.)"""

from __future__ import annotations

import json
import pickle

import pytest

from tourray.errors import UserError

SECRET = "tourray-secret-prune-7c2e"
SO = {"aws_access_key_id": "AKID", "aws_secret_access_key": SECRET, "aws_region": "eu-west-1"}
FLAG = ",".join(f"{k}={v}" for k, v in SO.items())


def _configs():
    from tourray.prune.apply import ApplyConfig
    from tourray.prune.evaluate import EvalSettings
    from tourray.prune.plan import PlanConfig
    from tourray.prune.sweep import SweepConfig
    from tourray.prune.width import WidthConfig
    from tourray.qa.job import QAConfig
    from tourray.stats.transport import TransportConfig

    return {"plan": (PlanConfig, dict(run="r", method="reverse", remove=1)),
            "apply": (ApplyConfig, dict(model="m", plan="p.json", out="o")),
            "width": (WidthConfig, dict(model="m", run="r", out="o")),
            "eval": (EvalSettings, {}),
            "sweep": (SweepConfig, dict(model="m", run="r")),
            "qa": (QAConfig, dict(model="m", run="r")),
            "transport": (TransportConfig, dict(student_lake="s3://b/s", teacher_lake="s3://b/t", run="r"))}


@pytest.mark.parametrize("name", ["plan", "apply", "width", "eval", "sweep", "qa", "transport"])
def test_storage_options_parsed_never_dumped(name):
    cls, base = _configs()[name]
    assert cls(**base).storage_options == {}
    flag = cls.parse({**base, "storage_options": FLAG})
    yaml_form = cls.parse({**base, "storage_options": dict(SO, allow_http=True)}, source="yaml")
    assert flag.storage_options == SO and yaml_form.storage_options == SO | {"allow_http": "true"}
    for cfg in (flag, yaml_form):
        assert "storage_options" not in cfg.model_dump() and "storage_options" not in cfg.model_dump(mode="json")
        assert SECRET not in cfg.model_dump_json() + repr(cfg) + str(cfg)
        # what a sweep / QA run hands on: model_copy (absolute_paths) and pickling (Ray) keep the field
        assert pickle.loads(pickle.dumps(cfg.model_copy(update={}))).storage_options == cfg.storage_options
    with pytest.raises(UserError) as e:
        cls.parse({**base, "storage_options": f"aws_secret_access_key:{SECRET}"})
    assert SECRET not in str(e.value) and "--storage-options" in str(e.value)


@pytest.mark.parametrize("argv", [["prune", "plan", "--run", "r", "--method", "reverse", "--remove", "1"],
                                  ["prune", "apply", "--model", "m", "--plan", "p", "--out", "o"],
                                  ["prune", "width", "--model", "m", "--run", "r", "--out", "o"],
                                  ["prune", "sweep", "--model", "m", "--run", "r"],
                                  ["prune", "verdict", "--base", "a", "--variant", "b"],
                                  ["qa", "--model", "m", "--run", "r"],
                                  ["transport", "--student-lake", "s", "--teacher-lake", "t", "--run", "r"]])
def test_every_command_takes_the_flag(argv):
    from tourray.config import config_from_args
    from tourray.cli import parser

    args = parser().parse_args([*argv, "--storage-options", FLAG])
    if argv[:2] == ["prune", "verdict"]:  # not config-backed: add_storage_options_flag
        assert args.storage_options == SO
        return
    cls = _configs()[argv[1] if argv[0] == "prune" else argv[0]][0]
    assert config_from_args(cls, args).storage_options == SO


def test_derived_configs_carry_the_options(tmp_path):
    """The configs a sweep / QA run builds for its captures, plans and patches keep the options."""
    from tourray.prune.sweep import SweepConfig, absolute_paths

    cfg = pickle.loads(pickle.dumps(absolute_paths(SweepConfig(model="m", run="r", lake=str(tmp_path),
                                                               storage_options=SO))))
    assert cfg.storage_options == SO
    cap = cfg.capture_config("m", "r.v", "m")
    assert cap.storage_options == SO and SECRET not in json.dumps(cap.model_dump(mode="json"))
    lake = cfg.open_lake()
    assert lake.storage_options == SO and SECRET not in repr(lake)


class _Opened(Exception):
    pass


@pytest.fixture
def opened(monkeypatch):
    """Every Lake the code under test opens: (root, storage_options); the first open stops it."""
    from tourray.lake import tables as lk
    import tourray.prune.verdict as verdict

    seen = []

    class Spy(lk.Lake):
        def __init__(self, root, storage_options=None):
            seen.append((root, storage_options))
            raise _Opened

    monkeypatch.setattr(lk, "Lake", Spy)
    monkeypatch.setattr(verdict, "Lake", Spy)
    return seen


def test_lakes_are_opened_with_the_options(opened, tmp_path):
    import argparse

    from tourray.prune.plan import PlanConfig, make_plan
    from tourray.prune.sweep import SweepConfig, check_variants
    from tourray.prune.verdict import cmd_verdict
    from tourray.stats.transport import TransportConfig, plan_transport

    calls = [lambda: make_plan(PlanConfig(lake=str(tmp_path), run="r", method="reverse", remove=1, storage_options=SO)),
             lambda: check_variants(SweepConfig(model="m", run="r", lake=str(tmp_path), methods="reverse", removed="1",
                                                patch="none", storage_options=SO)),
             lambda: cmd_verdict(argparse.Namespace(lake=str(tmp_path), base="a", variant="b", storage_options=SO,
                                                    format="table", config=None)),
             lambda: plan_transport(TransportConfig(student_lake=str(tmp_path), teacher_lake=str(tmp_path / "t"),
                                                    run="r", storage_options=SO))]
    for call in calls:
        opened.clear()
        with pytest.raises(_Opened):
            call()
        assert opened and all(so == SO for _, so in opened), opened
