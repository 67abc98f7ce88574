"""s3:// lakes end to end against moto's S3 server on loopback: capture, resume, SQL, verify, runs,
statistics; credentials from the environment or from storage_options (the API, and every command's
--storage-options, which no output, log or manifest shows); store errors reported as such.

Each scenario runs in a fresh Python process: Ray workers inherit the environment of the process that
starts Ray, so the S3 settings must be in place before the embedded Ray starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("moto.server")

from conftest import last_json, moto_s3  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BUCKET = "tourray-lake"
KEYS = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
            AWS_REGION="us-east-1")


@pytest.fixture(scope="module")
def s3():
    with moto_s3(BUCKET) as endpoint:
        yield endpoint


def clean_env(**extra) -> dict:
    """This environment without any AWS_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def s3_env(endpoint: str) -> dict:
    return clean_env(AWS_ENDPOINT_URL=endpoint, AWS_ENDPOINT=endpoint, AWS_ALLOW_HTTP="true", **KEYS)


SCENARIO = """
import json, os, sys
from tourray.capture import CaptureConfig, run_capture
from tourray.lake.tables import Lake
from tourray.lake.runs import list_runs, describe_run
from tourray.lake.sql import connect
from tourray.stats.tasks import StatsConfig, run_stats
from tourray.lake.verify import verify

lake_uri, model, corpus, so, executor = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
kw = dict(model=model, samples=corpus, lake=lake_uri, run="s3run", group_size=2, batch_size=2, stats=["moments"])
if so:
    kw["storage_options"] = so
cfg = CaptureConfig(**kw)
first = run_capture(cfg, progress=False, executor=executor)
lake = Lake(lake_uri, so or None)
# simulate a kill after the first groups: drop the last committed sample's rows so a re-run redoes it
last = sorted(lake.read("samples", ["sample_id"]).column(0).to_pylist())[-1]
for t in ("samples",):
    lake.delete(t, f"sample_id = '{last}'")
again = run_capture(cfg, progress=False, executor=executor)
third = run_capture(cfg, progress=False, executor=executor)
checked, problems = verify(lake, "s3run")
con = connect(lake)
n_tok = con.execute("SELECT count(*) FROM tokens WHERE run = 's3run'").fetchone()[0]
n_samp = con.execute("SELECT count(DISTINCT sample_id) FROM samples WHERE run = 's3run'").fetchone()[0]
n_act = con.execute("SELECT count(*) FROM token_layers WHERE run = 's3run'").fetchone()[0]
out = dict(first=first["captured"], again=[again["captured"], again["already_done"]], third=third["captured"],
           samples=first["samples"], checked=checked, problems=problems, n_tok=n_tok, n_samp=n_samp, n_act=n_act,
           runs=list_runs(lake), describe=describe_run(lake, "s3run"), tables=lake.tables())
st = run_stats(StatsConfig(lake=lake_uri, storage_options=so, run="s3run", pairs="consecutive", workers=1), progress=False)
out["stat_layers"] = len(st["sites"]["resid_post"]["layers"])
con = connect(lake)
out["layer_stats_rows"] = con.execute("SELECT count(*) FROM layer_stats WHERE run = 's3run'").fetchone()[0]
print(json.dumps(out, default=str))
"""


def check_scenario(out: dict, n_samples: int) -> None:
    assert out["first"] == n_samples == out["samples"]
    redone, kept = out["again"]
    assert 1 <= redone <= 2 and redone + kept == n_samples  # only the "killed" sample's group (size 2) was redone
    assert out["third"] == 0
    assert out["problems"] == [] and out["checked"] > 0
    assert out["n_samp"] == n_samples and out["n_tok"] > 0 and out["n_act"] > 0
    assert "s3run" in out["runs"] and "s3run" in out["describe"]
    assert {"runs", "samples", "tokens", "activations", "blocks"} <= set(out["tables"])
    assert out["stat_layers"] == 4 and out["layer_stats_rows"] >= 4  # embed + 3 blocks


def scenario(env: dict, lake_uri: str, model, corpus, storage_options: dict | None = None, executor: str = "ray") -> dict:
    p = subprocess.run([sys.executable, "-c", SCENARIO, lake_uri, str(model), str(corpus),
                        json.dumps(storage_options or {}), executor], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, f"rc {p.returncode}\nstderr:\n{p.stderr[-6000:]}"
    return last_json(p.stdout)


def test_s3_lake_env_credentials(s3, qwen3_model, corpus_dir):
    """Credentials from AWS_* in the environment. The capture runs in the driver (the local executor) and
    the statistics pass in Ray tasks, which inherit the environment; capture actors writing to S3 with
    credentials from the environment are tests/jobs/test_cluster.py's (and storage_options' below)."""
    n = len(list(Path(corpus_dir).rglob("*.txt")))
    out = scenario(s3_env(s3), f"s3://{BUCKET}/env-lake", qwen3_model, corpus_dir, executor="local")
    check_scenario(out, n)


SECRET = "tourray-secret-4f1d9c"  # moto takes any key pair: a distinctive one to look for in every output


def storage_options(endpoint: str) -> dict:
    return dict(aws_access_key_id="testing", aws_secret_access_key="testing", aws_region="us-east-1",
                aws_endpoint=endpoint, allow_http="true")


def test_s3_lake_storage_options_only(s3, qwen3_model, corpus_dir):
    """No AWS_* in the environment: everything the capture, SQL, verify, runs and statistics need
    comes from storage_options."""
    n = len(list(Path(corpus_dir).rglob("*.txt")))
    out = scenario(clean_env(AWS_EC2_METADATA_DISABLED="true"), f"s3://{BUCKET}/opts-lake", qwen3_model, corpus_dir,
                   storage_options(s3))
    check_scenario(out, n)


def test_lake_with_storage_options_only_reads_and_writes(s3, monkeypatch):
    """Lake itself, with the environment cleared: create, append, read, SQL through storage_options."""

    from tourray.lake import tables as lk
    from tourray.lake.sql import connect

    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    so = storage_options(s3) | {"allow_http": True}  # YAML gives a bool: the Lake makes it a string
    lake = lk.Lake(f"s3://{BUCKET}/opts-only/", so)
    assert lake.root == f"s3://{BUCKET}/opts-only" and lake.storage_options["allow_http"] == "true"
    assert not lake.exists("runs") and lake.tables() == []
    s = lk.schema("samples")
    assert lake.read("samples").num_rows == 0
    lake.ensure("samples", s)
    assert lake.exists("samples") and lake.tables() == ["samples"]
    con = connect(lake)
    assert con.execute("SELECT count(*) FROM samples").fetchone()[0] == 0


@pytest.mark.parametrize("config", ["capture", "stats", "solve"])
def test_config_storage_options_forms(config):
    """One parsing for every config's storage_options (flag text or YAML mapping), never dumped or shown."""
    from tourray.capture import CaptureConfig
    from tourray.errors import UserError
    from tourray.stats.solves import SolveConfig
    from tourray.stats.tasks import StatsConfig

    cls, base = {"capture": (CaptureConfig, dict(model="m", samples="s", run="r")),
                 "stats": (StatsConfig, dict(run="r")), "solve": (SolveConfig, {"from": "r:0"})}[config]
    flag = cls.parse({**base, "storage_options": "aws_region=eu-west-1, allow_http=true,aws_endpoint=http://h:9"})
    assert flag.storage_options == {"aws_region": "eu-west-1", "allow_http": "true", "aws_endpoint": "http://h:9"}
    yaml_form = cls.parse({**base, "storage_options": {"allow_http": True, "timeout": 30}}, source="yaml")
    assert yaml_form.storage_options == {"allow_http": "true", "timeout": "30"}
    assert cls(**base).storage_options == {}
    secret = cls.parse({**base, "storage_options": f"aws_secret_access_key={SECRET}"})
    assert SECRET not in repr(secret) and SECRET not in json.dumps(secret.model_dump(mode="json"))
    with pytest.raises((UserError, ValueError), match="key=value"):
        cls.parse({**base, "storage_options": "aws_region"})
    if config != "capture":  # tourray.capture.config keeps its own validator, which names the bad item
        with pytest.raises(UserError) as e:
            cls.parse({**base, "storage_options": f"aws_secret_access_key:{SECRET}"})
        assert SECRET not in str(e.value) and "--storage-options" in str(e.value)


def test_storage_options_flag(capsys):
    """Commands without a config take the same --storage-options; a bad one is refused without echoing it."""
    from tourray.cli import parser

    for argv in (["sql", "SELECT 1"], ["runs"], ["verify"], ["optimize"], ["repair"]):
        args = parser().parse_args([*argv, "--lake", "s3://b/l", "--storage-options", "aws_region=eu-west-1,allow_http=true"])
        assert args.storage_options == {"aws_region": "eu-west-1", "allow_http": "true"}, argv
        assert parser().parse_args(argv).storage_options == {}
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["runs", "--storage-options", f"aws_secret_access_key:{SECRET}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--storage-options" in err and "key=value" in err and SECRET not in err


@pytest.mark.parametrize("case", ["unreachable", "no_bucket"])
def test_store_errors_are_not_missing_tables(s3, case, monkeypatch):
    from tourray.errors import UserError
    from tourray.lake.tables import Lake

    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    so = storage_options(s3)
    uri = f"s3://{BUCKET}/lake"
    if case == "unreachable":
        so["aws_endpoint"] = "http://127.0.0.1:9"  # discard port: nothing listens
        want = "error sending request"
    else:
        uri = "s3://no-such-bucket-here/lake"
        want = "NoSuchBucket"
    lake = Lake(uri, so)
    with pytest.raises(UserError) as e:
        lake.exists("runs")
    msg = str(e.value)
    assert uri in msg and want in msg and "\n" not in msg


def test_cli_reports_store_error(s3, tmp_path):
    """`tourray runs` on an unreachable store: one error line naming the URI, exit 2 (not "no tables")."""
    env = clean_env(AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ENDPOINT="http://127.0.0.1:9", AWS_ALLOW_HTTP="true",
                    **KEYS)
    uri = f"s3://{BUCKET}/lake"
    p = subprocess.run([sys.executable, "-m", "tourray.cli", "runs", "--lake", uri], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and uri in lines[0] and "no tourray tables" not in lines[0], p.stderr


def test_cli_storage_options_only(s3, qwen3_model, corpus_dir, tmp_path, monkeypatch):
    """Every lake command takes --storage-options: with no AWS_* anywhere, capture, sql, runs, verify,
    stats, solve, prune plan, optimize and repair work on an s3:// lake, and the secret is in none of
    their outputs and logs, nor in the lake's manifests or the plan."""
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    so = storage_options(s3) | {"aws_secret_access_key": SECRET}
    uri, env = f"s3://{BUCKET}/cli-lake", clean_env(AWS_EC2_METADATA_DISABLED="true")

    def tourray(*args) -> str:
        p = subprocess.run([sys.executable, "-m", "tourray.cli", *map(str, args), "--lake", uri, "--storage-options",
                            ",".join(f"{k}={v}" for k, v in so.items())], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, f"{args[0]}: rc {p.returncode}\nstderr:\n{p.stderr[-6000:]}"
        assert SECRET not in p.stdout + p.stderr, args[0]
        return p.stdout

    n = len(list(Path(corpus_dir).rglob("*.txt")))
    assert f"captured {n} samples" in tourray("capture", "--model", qwen3_model, "--samples", corpus_dir, "--run", "cli",
                                              "--group-size", 2, "--no-progress")
    assert tourray("sql", "SELECT count(*) AS n FROM samples", "--format", "csv").splitlines()[-1] == str(n)
    assert "cli" in tourray("runs") and "cli" in tourray("runs", "--run", "cli")
    assert "all match" in tourray("verify", "--run", "cli", "--no-progress")
    assert "layer_stats:" in tourray("stats", "--run", "cli", "--no-progress")
    assert "solves row" in tourray("solve", "pca", "--from", "cli:1", "--k", 4, "--no-progress")
    plan = json.loads(tourray("prune", "plan", "--run", "cli", "--method", "block-influence", "--remove", 1))
    assert plan["lake"] == uri and len(plan["removed"]) == 1 and "token_layers" in plan["table_versions"]
    assert f"optimized {uri}" in tourray("optimize", "--older-than", "0s")
    assert "repaired 1 run(s)" in tourray("repair")
    from tourray.lake.tables import Lake

    lake = Lake(uri, so)
    stored = json.dumps([lake.read("runs").to_pylist(), lake.read("solves", ["params", "sources"]).to_pylist()], default=str)
    assert SECRET not in stored and "aws_endpoint" not in stored
