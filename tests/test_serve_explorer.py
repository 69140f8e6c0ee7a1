"""serve/explore.py and the explorer page: POST /v1/route, and the page at / in a real headless Chromium.

The browser test drives Debian's chromium through its version-matched chromedriver (Selenium); it is skipped,
saying so, where they are not installed (.ci/run installs them). HIERMEM_SCREENSHOT=PATH keeps its screenshot.
"""

import os
import shutil

import numpy as np
import pytest

from hiermem.eval.inference import MemoryContext
from serve_support import http, running_server

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.torch_threads

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
PROMPT = "Nantes has a population of about"


@pytest.fixture(scope="module")
def server(memory_run):
    with running_server(memory_run) as (base, run, _):
        yield base, run


def test_a_route_names_each_level_its_size_and_the_nearest_documents_of_its_leaf(server):
    base, run = server
    status, r = http(base + "/v1/route", {"prompt": PROMPT, "documents": 3, "router": "centroid"})
    assert status == 200, r
    assert r["path"] == MemoryContext(run, "fetched", "centroid").route([PROMPT])[0].tolist()
    c = run.clustering()
    train = c.doc_paths[~run.data().is_val()]
    for lv in r["levels"]:  # sizes count the training documents under each node
        assert lv["node"] == r["path"][lv["level"]]
        assert lv["documents"] == int((train[:, lv["level"]] == lv["node"]).sum())
    assert r["levels"][0]["documents"] >= r["levels"][1]["documents"] > 0
    docs = r["leaf_documents"]
    assert 0 < len(docs) <= 3 and [d["similarity"] for d in docs] == sorted((d["similarity"] for d in docs),
                                                                           reverse=True)
    assert all(c.doc_paths[d["document"], -1] == r["path"][-1] for d in docs)  # members of the leaf
    texts = run.data().texts()
    assert all(texts[d["document"]].startswith(d["text"].rstrip("…")) for d in docs)
    assert r["note"] is None and r["router"] == "centroid"


@pytest.mark.parametrize("body,param", [({"prompt": " "}, "prompt"), ({"prompt": "x", "block_level": 2}, "block_level"),
                                        ({"prompt": "x", "documents": 99}, "documents"), ({"prompt": 3}, "prompt")])
def test_bad_route_requests(server, body, param):
    status, err = http(server[0] + "/v1/route", body)
    assert status == 400 and err["error"]["param"] == param


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no browser: needs Debian's chromium and chromium-driver "
                                                      "(apt-get install -y chromium chromium-driver)")
def test_the_explorer_page_in_a_headless_browser(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, _ = server
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1240,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.get(base + "/")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        driver.find_element(By.ID, "prompt").send_keys(PROMPT)
        driver.find_element(By.ID, "explore").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
        _, route = http(base + "/v1/route", {"prompt": PROMPT})
        rows = driver.find_elements(By.CSS_SELECTOR, "#route tbody tr")
        assert [r.text.split() for r in rows] == [[str(lv["level"] + 1), str(lv["node"]), str(lv["documents"])]
                                                  for lv in route["levels"]]
        assert len(driver.find_elements(By.CSS_SELECTOR, "#docs li")) == len(route["leaf_documents"]) > 0
        for memory in ("fetched", "generic", "none"):
            _, res = http(base + "/v1/completions", {"prompt": PROMPT, "memory": memory, "max_tokens": 16,
                                                     "temperature": 0, "logprobs": 5})
            col = driver.find_element(By.ID, f"col-{memory}")
            assert col.find_element(By.CSS_SELECTOR, ".gen").get_attribute("textContent") == res["choices"][0]["text"]
            shown = [li.text.split("\n") for li in col.find_elements(By.CSS_SELECTOR, ".next li")]
            probs = [float(row[-1].rstrip("%")) for row in shown]
            assert len(shown) == 5 and probs == sorted(probs, reverse=True)
            assert probs[0] == pytest.approx(100 * np.exp(max(res["choices"][0]["logprobs"]["top_logprobs"][0].values())),
                                             abs=0.06)
        assert driver.find_element(By.ID, "route-error").text == ""
        shot = os.environ.get("HIERMEM_SCREENSHOT") or str(tmp_path / "explorer.png")
        assert driver.save_screenshot(shot) and os.path.getsize(shot) > 10_000
    finally:
        driver.quit()


def test_without_its_data_directory_a_run_still_routes_and_says_why_the_rest_is_missing(memory_run, tmp_path):
    from hiermem.errors import HiermemError
    from hiermem.eval.run import Run
    from hiermem.serve.app import create_app

    gone = [f"data.dir={tmp_path / 'gone'}"]
    with pytest.raises(HiermemError, match="gone"):  # the knn router needs the documents: refused at start
        create_app(Run(memory_run, device="cpu", overrides=gone), "tiny", router="knn")
    with running_server(memory_run, gone, router="centroid") as (base, _, _):
        status, r = http(base + "/v1/route", {"prompt": PROMPT})
        assert status == 200 and len(r["path"]) == 2 and r["leaf_documents"] == []
        assert all(lv["documents"] is None for lv in r["levels"]) and "gone" in r["note"]
        status, err = http(base + "/v1/completions", {"prompt": PROMPT, "router": "knn", "max_tokens": 2})
        assert status == 400 and err["error"]["param"] == "router"
        status, res = http(base + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        assert status == 200 and res["choices"][0]["route"]["router"] == "centroid"
