"""HealConfig: --teacher-run [LAKE:]RUN, refusals of bad values, and what a resume compares."""

from __future__ import annotations

import pytest

from tourray.errors import UserError
from tourray.heal.config import RESUMABLE, HealConfig


def cfg(**kw):
    return HealConfig.parse(dict(dict(student="s", teacher_run="t", out="o"), **kw))


@pytest.mark.parametrize("spec, want", [("run1", ("lake", "run1")), ("/data/lake:run1", ("/data/lake", "run1")),
                                        ("s3://b/lake:run1", ("s3://b/lake", "run1")), ("rel/lake:r.2", ("rel/lake", "r.2"))])
def test_teacher_run_names_a_lake_and_a_run(spec, want):
    assert cfg(teacher_run=spec).teacher() == want


@pytest.mark.parametrize("field, value", [("alpha", 1.5), ("alpha", -0.1), ("max_steps", 0), ("learning_rate", 0),
                                          ("learning_rate", -1e-4), ("batch_size", 0), ("temperature", 0)])
def test_bad_values_are_refused_naming_the_flag(field, value):
    with pytest.raises(UserError, match="--" + field.replace("_", "-")):
        cfg(**{field: value})


def test_identity_leaves_out_how_it_runs_and_lora_alpha_defaults():
    c = cfg(lora_rank=8)
    assert c.lora_alpha == 16.0
    assert not set(RESUMABLE) & set(c.identity()) and "learning_rate" in c.identity()
    assert cfg().run_name == "heal-o"
