"""The package as users get it: a built wheel (not the editable checkout) installed into a fresh venv
carries the lake's schemas/ and queries/, and `tourray --help`, a capture and a packaged query work from a
directory outside the repository.

The fresh venv reuses the main venv's site-packages for the dependencies (a .pth line: its own .pth
files, such as the editable install of this checkout, are not processed), so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
SHIPPED = ("pyproject.toml", "README.md", "LICENSE", "tourray")
def sh(*cmd, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=kw.pop("timeout", 600), **kw)
    assert p.returncode == 0, f"{cmd}: rc {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def test_wheel_installs_and_runs_outside_the_repo(qwen3_model, corpus_dir, tmp_path):
    # build from a copy of what ships, so the build leaves nothing in the checkout
    src = tmp_path / "src"
    src.mkdir()
    for name in SHIPPED:
        s = REPO / name
        if s.is_dir():
            shutil.copytree(s, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(s, src / name)
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", src)
    wheel = next((tmp_path / "dist").glob("tourray-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "tourray/lake/schemas/tokens.yaml" in names and "tourray/lake/queries/layer_similarity.sql" in names, names

    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv)
    py = venv / "bin" / "python"
    site = Path(sh(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "zz_main_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    sh(sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{venv / 'bin'}:{env['PATH']}")
    where = sh(py, "-c", "import tourray, tourray.lake.tables as lk; print(tourray.__file__); print(lk.schema('tokens'))",
               cwd=outside, env=env).stdout
    assert where.startswith(str(site)), where  # the installed copy, not the checkout
    tourray = venv / "bin" / "tourray"
    assert "capture" in sh(tourray, "--help", cwd=outside, env=env).stdout
    out = sh(tourray, "capture", "--model", qwen3_model, "--samples", corpus_dir, "--lake", "lake", "--run", "pkg",
             "--no-progress", cwd=outside, env=env, timeout=600)
    assert (outside / "lake" / "tokens.lance").is_dir(), out.stderr[-3000:]
    q = sh(tourray, "sql", "--lake", "lake", "--query", "layer_similarity", "--param", "run=pkg", "--format", "csv",
           cwd=outside, env=env).stdout
    rows = [l for l in q.splitlines() if l.strip()]
    assert len(rows) == 1 + 3 and "layer" in rows[0], q  # a header and one row per block
