"""The page in a real browser (Debian's chromium and chromium-driver, headless, driven by Selenium; no
network): the map draws its countries and the corpus stops, a click drops a pin whose plus code and
nearest city appear, "Tell me" streams the text of both models in, an example loads instantly, and
every resource came from the app itself. Saves a screenshot (and to $TOURRAY_SCREENSHOT when set).

Skipped when chromium is absent: `make test`'s set-up installs it (apt-get install chromium chromium-driver).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from conftest import free_port
from serve_fixtures import SYS, chatty_llama, chatty_qwen3, engines, one_thread, system_prompt_file  # noqa: F401

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
                                reason="needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver "
                                       "(make test's set-up does this)")
PLUS_CODE = re.compile(r"^[23456789CFGHJMPQRVWX]{8}\+[23456789CFGHJMPQRVWX]{2}$")
OPERA = (-33.8568, 151.2153)


@pytest.fixture(scope="module")
def server(engines, tmp_path_factory):  # noqa: F811
    """The app over the tiny models, served by uvicorn in a thread (what `tourray serve --in-process` runs)."""
    import uvicorn

    from tourray.serve.app import create_app
    from tourray.model.decoding import TOUR_DECODING

    ex = tmp_path_factory.mktemp("ex") / "examples.json"
    ex.write_text(json.dumps({"generated_at": "2026-12-05 00:00 UTC", "examples": [{
        "title": "Terracotta Army", "lat": 34.3853, "lng": 109.2785, "plus_code": "8P4MP7P9+4C", "place": "Terracotta Army",
        "tags": ["history"], "style": "brief", "max_new_tokens": 80, "decoding_text": "greedy",
        "outputs": [{"model": "original", "label": "smol", "parameters": 134515008, "text": "Pre-generated words.",
                     "n_new_tokens": 3, "stopped": True, "ttft_ms": 100.0, "tokens_per_s": 20.0, "seconds": 0.2}]}]}))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(engines, TOUR_DECODING, ex), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    t.join(10)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1360,860",
              "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait(driver, fn, timeout=60, what=""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: fn(d), message=what)


def test_click_the_map_see_the_pin_and_the_streamed_text(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    d = browser
    d.get(server)
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tags input")) == 10, what="tag checkboxes")
    wait(d, lambda d: d.execute_script("return document.querySelectorAll('path.leaflet-interactive').length") >= 200,
         what="corpus stops drawn")
    wait(d, lambda d: d.execute_script("return document.querySelectorAll('.leaflet-overlay-pane path').length") > 250,
         what="country shapes drawn")
    assert "main: chatty-llama" in d.find_element(By.ID, "models").text and "compare:" in d.find_element(By.ID, "models").text
    assert "GeoNames" in d.find_element(By.ID, "attribution").text

    # click the map where the Sydney Opera House is
    d.execute_script("state.map.setView(arguments[0], 13, {animate: false});", list(OPERA))
    x, y = d.execute_script("const p = state.map.latLngToContainerPoint(arguments[0]); return [p.x, p.y];", list(OPERA))
    m = d.find_element(By.ID, "map")
    ActionChains(d).move_to_element_with_offset(m, int(x - m.size["width"] / 2), int(y - m.size["height"] / 2)).click().perform()
    wait(d, lambda d: PLUS_CODE.match(d.find_element(By.ID, "pin-code").text), what="the pin's plus code")
    code = d.find_element(By.ID, "pin-code").text
    assert code.startswith("4RRH46"), code  # within a cell or two of the Opera House's 4RRH46V8+74
    assert "Sydney, Australia" in d.find_element(By.ID, "pin-place").text

    d.find_element(By.CSS_SELECTOR, "#tags input[value=history]").click()
    d.execute_script("""window.__updates = 0;
        new MutationObserver(() => window.__updates++).observe(document.getElementById('outputs'),
            {subtree: true, childList: true, characterData: true});""")
    d.find_element(By.ID, "go").click()
    wait(d, lambda d: "TTFT" in d.find_element(By.CSS_SELECTOR, "#out-compare .stats").text, timeout=120, what="both answers")
    for name in ("main", "compare"):
        card = d.find_element(By.ID, f"out-{name}")
        assert card.find_element(By.CSS_SELECTOR, ".text").text.strip(), name
        stats = card.find_element(By.CSS_SELECTOR, ".stats").text
        assert re.search(r"TTFT \d+ ms · ([\d.]+|-) tokens/s", stats), stats
        assert "parameters" in card.find_element(By.CSS_SELECTOR, ".meta").text
        assert "repetition penalty 1.1" in card.find_element(By.CSS_SELECTOR, ".meta").text
    assert d.execute_script("return window.__updates") > 6  # the text grew piece by piece, not in one go
    shot = tmp_path / "serve.png"
    d.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("TOURRAY_SCREENSHOT"):
        shutil.copy(shot, os.environ["TOURRAY_SCREENSHOT"])

    # a pre-generated example shows at once
    d.find_element(By.CSS_SELECTOR, "#examples button").click()
    wait(d, lambda d: "Pre-generated words." in d.find_element(By.ID, "outputs").text, timeout=5, what="the example")
    assert d.find_element(By.ID, "pin-code").text == "8P4MP7P9+4C"

    # nothing came from anywhere but the app
    origins = d.execute_script("return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert origins and set(origins) == {server.rstrip("/")}, set(origins)
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"] if hasattr(d, "get_log") else []
    assert not errors, errors
