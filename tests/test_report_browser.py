"""latent_map.html and report.html in a real browser: Debian's headless Chromium opens the pages of a
run whose case ids are HTML, clicks a point (through the pages' own `#case=ID` link, which dispatches
a click on that case's point) and the test reads the resulting DOM."""

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest
from dataset_writers import phantom, write_case
from tiny_runs import tiny_config

from hypersort_core.report import analyze_run
from hypersort_core.train import fit

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)"),
    pytest.mark.usefixtures("one_torch_thread"),
]

HOSTILE_IDS = ("<img src=x onerror=alert(1)>", "a&b \"q\" 'x' <!--", "plain")  # file names: no '/'
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=3000",
    "--dump-dom",
)


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    """A run trained on cases whose ids (and so file names) are hostile HTML, then analyzed."""
    data = tmp_path_factory.mktemp("hostile") / "data"
    for index, case_id in enumerate(HOSTILE_IDS):
        write_case(data, *phantom(index), case_id=case_id)
    run = fit(data, data.parent / "run", tiny_config(), progress=False)
    return analyze_run(run.run_dir, progress=False)


class Dom(HTMLParser):
    """What the test reads of a dumped DOM: every element's attributes, and the text of elements by id."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: dict[str, str] = {}
        self.open: list[tuple[str, str | None]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = {name: value or "" for name, value in attrs}
        self.elements.append((tag, attributes))
        if tag not in ("img", "meta", "input", "br", "link"):  # void elements have no end tag
            self.open.append((tag, attributes.get("id")))
            self.text.setdefault(attributes.get("id"), "")

    def handle_endtag(self, tag):
        while self.open and self.open.pop()[0] != tag:
            pass

    def handle_data(self, data):
        for _, element_id in self.open:
            self.text[element_id] = self.text.get(element_id, "") + data

    def find(self, tag: str, **attributes) -> list[dict[str, str]]:
        return [found for name, found in self.elements if name == tag and all(found.get(k) == v for k, v in attributes.items())]


def open_in_chromium(page: Path, case_id: str, profile: Path) -> tuple[Dom, list[str]]:
    """The DOM once the page has shown `case_id`, and every console message Chromium logged."""
    url = f"{page.as_uri()}#case={quote(case_id, safe='')}"
    result = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return Dom(result.stdout), [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.parametrize("page", ["latent_map.html", "report.html"])
def test_a_click_on_a_point_shows_that_case_and_names_stay_text(analysis, page, tmp_path):
    for shown, case_id in enumerate(HOSTILE_IDS[:2]):
        dom, console = open_in_chromium(analysis.run_dir / page, case_id, tmp_path / f"profile{shown}")

        assert console == []  # no error, no blocked request, no message at all
        points = [circle["class"].split() for circle in dom.find("circle") if "point" in circle["class"].split()]
        assert len(points) == len(HOSTILE_IDS)
        assert sum("selected" in point for point in points) == 1
        embedded = {case["id"]: case for case in json.loads(dom.text["map-data"])["cases"]}
        assert dom.text["panel-caption"] == case_id
        assert dom.find("img", id="panel-picture")[0]["src"] == embedded[case_id]["picture"]
        assert case_id in dom.text["panel-label"]
        assert dom.find("img", src="x") == []  # the hostile id never became an element
