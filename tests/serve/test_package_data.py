"""What the tour guide needs at run time ships in the wheel: the places table, the `tours` schema, the
page and every vendored file it loads (a user's laptop has no network and no checkout)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def test_wheel_carries_the_page_the_places_and_the_schema(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "tourray"):
        s = REPO / name
        (shutil.copytree(s, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")) if s.is_dir()
         else shutil.copy2(s, src / name))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                        str(src)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    names = set(zipfile.ZipFile(next((tmp_path / "dist").glob("tourray-*.whl"))).namelist())
    static = REPO / "tourray" / "serve" / "static"
    shipped = {f"tourray/serve/static/{f.relative_to(static).as_posix()}" for f in static.rglob("*") if f.is_file()}
    assert shipped <= names, sorted(shipped - names)
    assert {"tourray/corpus/places.tsv", "tourray/lake/schemas/tours.yaml", "tourray/serve/static/index.html",
            "tourray/serve/static/vendor/leaflet-1.9.4/LICENSE", "tourray/serve/static/vendor/world-atlas-2.0.2/countries-50m.json"} <= names
    html = (static / "index.html").read_text()
    for ref in re.findall(r'(?:src|href)="/static/([^"]+)"', html):  # every file the page asks for is in the wheel
        assert f"tourray/serve/static/{ref}" in names, ref
