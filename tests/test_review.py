"""`hsort review`: the local review server — what it serves, what it refuses, and how it records decisions."""

import csv
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cli_checks import assert_one_line_error
from click.testing import CliRunner

from hypersort_core.cli.curate import review
from hypersort_core.decisions import read_decisions
from hypersort_core.review import ReviewSession, serve
from hypersort_core.run import load_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def server(analysed_run):
    """The review server of the run on a free loopback port, serving in a thread; review.csv starts empty."""
    (analysed_run / "review.csv").unlink(missing_ok=True)
    session = ReviewSession(load_run(analysed_run, "cpu"), "tester")
    server = serve(session)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, session
    server.shutdown()
    server.server_close()


def request(server, method, path, body=None, headers=None):
    """A raw request (the path is sent exactly as given, `..` and all); returns the status and the body."""
    host, port = server.server_address
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request(method, path, body=body, headers={"Host": f"{host}:{port}", **(headers or {})})
    response = connection.getresponse()
    return response.status, response.read()


def post_decision(server, token, case, decision="fine", style="", **headers):
    body = json.dumps({"case": case, "decision": decision, "style": style, "note": "", "reviewer": "tester"})
    return request(server, "POST", "/api/decision", body, {"Content-Type": "application/json", **({"X-Review-Token": token} if token else {}), **headers})


def test_the_page_and_its_data_are_served_with_the_token(server):
    server, session = server
    status, page = request(server, "GET", f"/?token={session.token}")
    assert status == 200 and b"<canvas" not in page and b'id="views"' in page
    status, body = request(server, "GET", f"/api/cases?token={session.token}")
    cases = json.loads(body)
    assert status == 200 and {case["id"] for case in cases["cases"]} == set(session.run.case_ids)
    assert [style["name"] for style in cases["styles"]][0] == "lambda0"
    case = cases["cases"][0]["id"]
    status, body = request(server, "GET", f"/api/slice?token={session.token}&case={case}&plane=coronal&index=5&style=lambda0")
    section = json.loads(body)
    assert status == 200 and section["index"] == 5 and (section["rows"], section["columns"]) == (16, 16)


@pytest.mark.parametrize(
    "path",
    [
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "//etc/passwd",
        "/etc/passwd",
        "/api/case?case=../../etc/passwd",
        "/api/case?case=/etc/passwd",
        "/api/slice?case=%2Fetc%2Fpasswd&plane=axial&index=0",
        "/api/slice?case=synth_000&plane=../x&index=0",
    ],
)
def test_paths_outside_the_run_are_refused(server, path):
    server, session = server
    separator = "&" if "?" in path else "?"
    status, body = request(server, "GET", f"{path}{separator}token={session.token}")
    assert status == 404
    assert b"root:" not in body


@pytest.mark.parametrize("path", ["/", "/api/cases", "/api/case?case=synth_000", "/api/slice?case=synth_000&plane=axial&index=0"])
def test_reads_without_the_token_are_refused(server, path):
    server, _ = server
    status, body = request(server, "GET", path)
    assert status == 403 and b"token" in body
    status, _ = request(server, "GET", f"{path}{'&' if '?' in path else '?'}token=wrong")
    assert status == 403


def test_writes_without_the_token_or_from_another_origin_are_refused(server, analysed_run):
    server, session = server
    assert post_decision(server, None, "synth_000")[0] == 403
    assert post_decision(server, "wrong", "synth_000")[0] == 403
    assert post_decision(server, session.token, "synth_000", Origin="http://evil.example")[0] == 403
    assert post_decision(server, session.token, "synth_000", Host="evil.example:80")[0] == 403  # a rebound name
    status, _ = request(server, "POST", f"/api/decision?token={session.token}", b'{"case": "synth_000", "decision": "fine"}')
    assert status == 403  # a token in the address does not do for a write
    assert not (analysed_run / "review.csv").exists()

    assert post_decision(server, session.token, "synth_000")[0] == 200
    assert list(read_decisions(analysed_run / "review.csv")) == ["synth_000"]


def test_bad_decisions_are_refused_and_not_recorded(server, analysed_run):
    server, session = server
    assert post_decision(server, session.token, "../../etc/passwd")[0] == 404
    assert post_decision(server, session.token, "synth_000", "delete_everything")[0] == 400
    assert post_decision(server, session.token, "synth_000", "use_prediction", "")[0] == 400
    assert not (analysed_run / "review.csv").exists()


def test_the_server_listens_on_loopback_only(server):
    server, _ = server
    host, port = server.server_address
    assert host == "127.0.0.1"
    addresses = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # the address of the default route (no packet is sent)
        try:
            probe.connect(("192.0.2.1", 9))
            addresses.add(probe.getsockname()[0])
        except OSError:
            pass
    outside = sorted(address for address in addresses if not address.startswith("127."))
    if not outside:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    for address in outside:
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=5).close()


def test_decisions_from_many_tabs_at_once_are_all_kept(server, analysed_run):
    server, session = server
    cases = session.run.case_ids

    def decide(case):
        for decision in ("fine", "hard_but_correct"):
            assert post_decision(server, session.token, case, decision)[0] == 200

    threads = [threading.Thread(target=decide, args=(case,)) for case in cases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    decisions = read_decisions(analysed_run / "review.csv")
    assert sorted(decisions) == sorted(cases)
    assert {decision.decision for decision in decisions.values()} == {"hard_but_correct"}
    with open(analysed_run / "review.csv", newline="") as handle:
        assert next(csv.reader(handle)) == ["case", "decision", "style", "note", "reviewer", "time"]


def test_a_port_in_use_is_one_line(analysed_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(review, [str(analysed_run), "--port", str(port), "--no-browser", "--device", "cpu"])
    assert_one_line_error(result, f"127.0.0.1:{port}")
    assert "in use" in result.stderr


def test_a_run_without_a_ranking_is_one_line(trained_run, tmp_path):
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    (run_dir / "ranking.csv").unlink(missing_ok=True)
    result = CliRunner().invoke(review, [str(run_dir), "--no-browser", "--device", "cpu"])
    assert_one_line_error(result, run_dir / "ranking.csv")


def test_hsort_review_serves_until_ctrl_c(analysed_run):
    """The command itself: it prints the address with its token, serves the page there, and Ctrl-C ends it cleanly."""
    hsort = Path(sys.executable).with_name("hsort")
    process = subprocess.Popen(
        [str(hsort), "review", str(analysed_run), "--no-browser", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        address = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=(\S+)", process.stdout.readline())
        assert address is not None
        connection = http.client.HTTPConnection("127.0.0.1", int(address.group(1)), timeout=60)
        connection.request("GET", f"/?token={address.group(2)}")
        assert connection.getresponse().status == 200
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "hsort curate" in out and "Traceback" not in err
