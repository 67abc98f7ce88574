"""`tourray repair`'s file half on every store: never-committed fragment files are found and removed
with the lake's own credentials (an s3:// lake whose credentials are only in storage_options), and
committed files are left alone. Row repair is tested with real captures in tests/capture/."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tests.conftest import moto_s3
from tourray.lake import tables as lk
from tourray.lake.repair import remove_unreferenced, unreferenced_files


def _tokens(sample: str, n: int = 4) -> pa.Table:
    rows = [dict(run="r", sample_id=sample, pos=i, token_id=i, token="x", char_start=None, char_end=None,
                 segment="text", surprisal=None, entropy=None, token_class=None, kl_ref=None) for i in range(n)]
    return pa.Table.from_pylist(rows, schema=lk.schema("tokens"))


@pytest.fixture(params=["folder", "s3"])
def lake(request, tmp_path, monkeypatch):
    if request.param == "folder":
        yield lk.Lake(str(tmp_path / "lake"))
        return
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT", "AWS_REGION",
              "AWS_DEFAULT_REGION", "AWS_ALLOW_HTTP"):
        monkeypatch.delenv(k, raising=False)  # the credentials are only in storage_options
    with moto_s3("repair-bucket") as endpoint:
        yield lk.Lake("s3://repair-bucket/lake", dict(aws_access_key_id="testing", aws_secret_access_key="testing",
                                                       aws_region="us-east-1", aws_endpoint=endpoint, allow_http="true"))


def test_never_committed_files_are_removed_and_committed_ones_kept(lake):
    sch = lk.schema("tokens")
    lake.ensure("tokens", sch)
    lake.commit("tokens", lake.write_fragments("tokens", _tokens("a"), sch))
    lake.write_fragments("tokens", _tokens("b"), sch)  # an actor's fragment whose group never committed
    stray = unreferenced_files(lake, "tokens", min_age_s=0)
    assert len(stray) == 1
    assert unreferenced_files(lake, "tokens", min_age_s=3600) == []  # too fresh: maybe a live writer's
    assert remove_unreferenced(lake, min_age_s=0) == {"tokens": 1}
    assert unreferenced_files(lake, "tokens", min_age_s=0) == []
    assert lake.read("tokens", ["sample_id"]).column(0).to_pylist() == ["a"] * 4  # committed data intact


def test_a_live_writers_files_are_kept(lake):
    """A file younger than a live lease is a writer's in-flight fragment: kept (file times on the
    store's clock, lease times on the writer's), removed once the writer is gone."""
    sch = lk.schema("tokens")
    lake.ensure("tokens", sch)
    with lake.lease("writer"):
        lake.write_fragments("tokens", _tokens("b"), sch)
        assert remove_unreferenced(lake, min_age_s=0) == {}
    assert remove_unreferenced(lake, min_age_s=0) == {"tokens": 1}
