"""The review page in a real browser: Debian's headless Chromium, driven by Playwright (`executable_path`, so
Playwright downloads no browser of its own). A curator scrolls slices, switches style, decides by keyboard
and by mouse, reloads and finds the decisions kept; two tabs keep each other's; `hsort curate` applies them."""

import csv
import shutil
import threading

import pytest
from click.testing import CliRunner

from hypersort_core.cli.curate import curate
from hypersort_core.decisions import read_decisions
from hypersort_core.report import analyze_run
from hypersort_core.review import ReviewSession, page_url, serve
from hypersort_core.run import load_run

CHROMIUM = shutil.which("chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[test]')")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)"),
    pytest.mark.usefixtures("one_torch_thread"),
]
TIMEOUT_MS = 60_000  # a busy 2-core machine segments a case for a style in a second or two; leave room


@pytest.fixture
def review_page(analysed_run):
    """A browser tab on the review page of an analyzed copy of the trained run (no decisions yet), and that run's folder."""
    run_dir = analysed_run
    (run_dir / "review.csv").unlink(missing_ok=True)
    session = ReviewSession(load_run(run_dir, "cpu"), "tester")
    server = serve(session)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        problems = []
        page.on("console", lambda message: problems.append(message.text) if message.type in ("error", "warning") else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(page_url(server, session))
        yield page, run_dir, problems
        browser.close()
    server.shutdown()
    server.server_close()


def shown_case(page) -> str:
    return page.locator("#case-title").inner_text()


def wait_for_slices(page) -> None:
    for plane in ("axial", "coronal", "sagittal"):
        sync_api.expect(page.locator(f"#caption-{plane}")).to_contain_text(plane)


def wait_for_decision(page, text: str) -> None:
    sync_api.expect(page.locator("#decision")).to_have_text(text)


def ranking(run_dir) -> list[str]:
    with open(run_dir / "ranking.csv", newline="") as handle:
        return [row["case"] for row in csv.DictReader(handle)]


def test_review_in_chromium_scroll_switch_style_decide_reload_and_curate(review_page, tmp_path):
    page, run_dir, problems = review_page
    order = ranking(run_dir)
    wait_for_slices(page)
    assert shown_case(page) == order[0]  # worst first by the ranking's own score

    # every slice of a plane is reachable: the wheel moves one slice, the slider anywhere
    axial = page.locator("#caption-axial")
    sync_api.expect(axial).to_have_text("axial 9 / 16")
    before = page.locator("#canvas-axial").evaluate("canvas => canvas.toDataURL()")
    page.locator("#canvas-axial").hover()
    page.mouse.wheel(0, 100)
    sync_api.expect(axial).to_have_text("axial 10 / 16")
    assert page.locator("#canvas-axial").evaluate("canvas => canvas.toDataURL()") != before
    page.locator("#slider-sagittal").fill("0")
    sync_api.expect(page.locator("#caption-sagittal")).to_have_text("sagittal 1 / 16")
    page.locator("#slider-sagittal").fill("15")
    sync_api.expect(page.locator("#caption-sagittal")).to_have_text("sagittal 16 / 16")

    # another style's prediction is fetched and drawn
    with page.expect_response(lambda response: "style=cluster_0" in response.url and response.ok):
        page.locator("#style").select_option("cluster_0")
    page.locator("#window").focus()
    page.locator("#window").select_option("400,40")  # the window applies at once, and the keys decide again

    # decisions by keyboard and by mouse; a note typed with digits in it decides nothing
    page.keyboard.press("1")
    wait_for_decision(page, "wrong: use prediction (cluster_0)")
    page.keyboard.press("n")
    sync_api.expect(page.locator("#case-title")).to_have_text(order[1])
    page.get_by_role("button", name="wrong: exclude").click()
    wait_for_decision(page, "wrong: exclude")
    page.get_by_role("button", name="next").click()
    sync_api.expect(page.locator("#case-title")).to_have_text(order[2])
    page.locator("#note").fill("tip cut at slice 4")
    page.locator("#note").press("4")
    wait_for_decision(page, "none")
    page.locator("#case-title").click()  # leave the note
    page.keyboard.press("3")
    wait_for_decision(page, "hard but correct")
    page.keyboard.press("p")
    sync_api.expect(page.locator("#case-title")).to_have_text(order[1])
    page.locator("#note").fill("organ fully outside the label")  # a note added after deciding is kept with it
    with page.expect_response(lambda response: "/api/decision" in response.url and response.ok):
        page.locator("#case-title").click()

    # reopened, the page resumes at the first undecided case and shows every decision made
    page.reload()
    wait_for_slices(page)
    assert shown_case(page) == order[3]
    page.locator("#cases li", has_text=order[2]).click()
    wait_for_decision(page, "hard but correct")
    sync_api.expect(page.locator("#note")).to_have_value("tip cut at slice 44")
    sync_api.expect(page.locator("#map circle.current")).to_have_count(1)
    assert problems == []

    decisions = read_decisions(run_dir / "review.csv")
    assert {case: (d.decision, d.style) for case, d in decisions.items()} == {
        order[0]: ("use_prediction", "cluster_0"),
        order[1]: ("exclude", ""),
        order[2]: ("hard_but_correct", ""),
    }
    assert decisions[order[1]].note == "organ fully outside the label"

    result = CliRunner().invoke(curate, [str(run_dir), "--out", str(tmp_path / "curated"), "--quiet", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "curated" / "curation.csv", newline="") as handle:
        sources = {row["case"]: row["label_source"] for row in csv.DictReader(handle)}
    assert (sources[order[0]], sources[order[1]], sources[order[2]]) == ("prediction", "left out", "given")


def test_two_tabs_keep_each_others_decisions(review_page):
    page, run_dir, problems = review_page
    order = ranking(run_dir)
    wait_for_slices(page)
    other = page.context.new_page()
    other.goto(page.url)
    wait_for_slices(other)

    page.keyboard.press("4")  # both tabs start at the same case, each decides a different one
    wait_for_decision(page, "fine")
    other.locator("#cases li", has_text=order[1]).click()
    sync_api.expect(other.locator("#case-title")).to_have_text(order[1])
    other.keyboard.press("2")
    wait_for_decision(other, "wrong: exclude")

    assert {case: d.decision for case, d in read_decisions(run_dir / "review.csv").items()} == {order[0]: "fine", order[1]: "exclude"}
    sync_api.expect(other.locator("#progress")).to_have_text(f"2 of {len(order)} cases decided")  # the answer carries both tabs' decisions

    # worst first by any score, one cluster only, the undecided only
    with open(run_dir / "ranking.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_norm = [row["case"] for row in sorted(rows, key=lambda row: -float(row["norm"]))]
    page.locator("#order").select_option("norm")
    sync_api.expect(page.locator("#cases li").first).to_contain_text(f"1. {by_norm[0]}")
    page.locator("#cluster").select_option("0")
    sync_api.expect(page.locator("#cases li")).to_have_count(sum(row["cluster"] == "0" for row in rows))
    page.locator("#cluster").select_option("")
    page.locator("#undecided-only").check()
    sync_api.expect(page.locator("#cases li")).to_have_count(len(order) - 1)  # less the case the other tab decided (this one's is shown)
    sync_api.expect(page.locator("#progress")).to_have_text(f"2 of {len(order)} cases decided")
    assert problems == []


def test_report_html_scrolls_through_every_slice_of_its_gallery_cases(trained_run, tmp_path):
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    analysis = analyze_run(run_dir, progress=False, gallery=2)
    worst = int(analysis.ranking[0])
    assert set(analysis.views) == set(analysis.ranking[:2].tolist())  # the gallery's cases, no others
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        problems = []
        page.on("console", lambda message: problems.append(message.text) if message.type in ("error", "warning") else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto((run_dir / "report.html").as_uri())

        page.locator(f'button[data-view="{worst}"]').click()
        caption = page.locator(f"#v{worst}-caption-axial")
        sync_api.expect(caption).to_have_text("axial 9 / 16")
        canvas = page.locator(f"#v{worst}-canvas-axial")
        before = canvas.evaluate("canvas => canvas.toDataURL()")
        canvas.hover()
        for _ in range(3):
            page.mouse.wheel(0, -100)
        sync_api.expect(caption).to_have_text("axial 6 / 16")
        assert canvas.evaluate("canvas => canvas.toDataURL()") != before
        page.locator(f"#v{worst}-slider-coronal").fill("0")
        sync_api.expect(page.locator(f"#v{worst}-caption-coronal")).to_have_text("coronal 1 / 16")
        assert page.locator(f'figure:has(button[data-view="{worst}"]) img').is_hidden()
        browser.close()
    assert problems == []  # the page's own scripts only (CSP), nothing blocked, no error
