"""`hsort review`: a local page on which a curator goes through the ranked cases and records a decision for each.

The server (the standard library's threading HTTP server) binds to 127.0.0.1 only. It serves no file by
path: the page is built here, and every volume is named by a case id looked up in the run's case list,
so no request can reach another file (`../../etc/passwd` is simply not a case). A random token, part of
the URL that `hsort review` opens, is required on every request for the page and its data (and, for
writes, in a header that a page of another origin cannot set without the browser's leave); the Host
header must name the loopback address, so a web page that rebinds its own name to 127.0.0.1 is refused.

Volumes load lazily: the case list is the run's ranking.csv and latents; a case's image, label and a
style's prediction are read (and segmented, as `hsort predict` does) when the page first asks for one of
its slices, kept for a few cases, and sent one slice at a time, downsampled to at most 256 voxels a side.
Slices are shown in RAS orientation (axial, coronal, sagittal) with the voxel sizes kept.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import hmac
import json
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from hypersort_core.analysis import RANKED_BY
from hypersort_core.data import Case, DataError, read_dataset, select_labels
from hypersort_core.data.volumes import read_case, voxel_sizes
from hypersort_core.decisions import DECISIONS, MAIN_STYLE, REVIEW_NAME, new_decision, read_decisions, record_decision
from hypersort_core.faults import describe_os_error
from hypersort_core.latents import map_plane
from hypersort_core.predict import latent_probabilities, segment
from hypersort_core.report import SLICE_VIEWER_SCRIPT, around_foreground, script_hash
from hypersort_core.run import Run
from hypersort_core.run_folder import RANKING_NAME
from hypersort_core.styles import cluster_latents

LOOPBACK = "127.0.0.1"
MAX_SLICE_SIDE = 256  # voxels a side of a slice sent to the page
WINDOW_MARGIN = 6  # voxels around the label whose grey values set the "auto" window
CACHED_CASES = 3  # a 512² x 600 CT is 0.6 GB as float32
TOKEN_HEADER = "X-Review-Token"
PLANES = {"axial": 2, "coronal": 1, "sagittal": 0}  # plane -> the RAS axis it is fixed across
NOT_SCORES = {"rank", "case", "cluster", "style", "label"}
LOWER_IS_WORSE = {"dice_lambda0"}
MAX_BODY_BYTES = 64 * 1024


@dataclass
class CaseVolumes:
    """A case in RAS orientation (views of the arrays as read, not copies): image, given label (classes) and the
    voxel sizes; predictions by style."""

    image: np.ndarray
    label: np.ndarray
    spacing: np.ndarray
    orientation: np.ndarray  # nibabel's ornt from the original grid to RAS
    affine: np.ndarray
    original: np.ndarray  # the image on its original grid (what a style segments)
    window: tuple[float, float]  # 1st and 99th percentile around the label: the "auto" window
    predictions: dict[str, np.ndarray]


class ReviewSession:
    """What the page shows and records, for one run."""

    def __init__(self, run: Run, reviewer: str = ""):
        self.run = run
        self.reviewer = reviewer
        self.token = secrets.token_urlsafe(24)
        self.review_file = run.run_dir / REVIEW_NAME
        self.rows = ranking_rows(run.run_dir / RANKING_NAME)
        self.styles = {MAIN_STYLE: np.zeros(run.config.model.latent_dim, dtype=np.float32)} | {named.name: named.latent for named in cluster_latents(run)}
        dataset = read_dataset(run.data, run.config.layout, split=run.config.split)
        self.dataset = dataset
        self.selection = select_labels(dataset, run.config.label)
        self.cases: dict[str, Case] = {case.case_id: case for case in dataset.cases if case.case_id in set(run.case_ids)}
        self._volumes: OrderedDict[str, CaseVolumes] = OrderedDict()
        self._lock = threading.Lock()
        read_decisions(self.review_file, run.case_ids)  # a damaged review.csv is reported before the page opens

    def case_list(self) -> dict:
        """Every case in ranking order with its scores, cluster and place on the latent map; the decisions so far."""
        xy = dict(zip(self.run.case_ids, map_plane(self.run.latents).tolist()))
        columns = [name for name in self.rows[0] if name not in NOT_SCORES] if self.rows else []
        return {
            "columns": [{"name": name, "lowerIsWorse": name in LOWER_IS_WORSE} for name in columns],
            "rankedBy": RANKED_BY if RANKED_BY in columns else next(iter(columns), None),
            "styles": [{"name": name, "latent": [float(value) for value in latent]} for name, latent in self.styles.items()],
            "decisionNames": DECISIONS,
            "reviewer": self.reviewer,
            "cases": [
                {
                    "id": row["case"],
                    "cluster": int(row["cluster"]),
                    "label": row.get("label", ""),
                    "xy": xy[row["case"]],
                    "scores": {name: float(row[name]) for name in columns},
                }
                for row in self.rows
                if row["case"] in self.cases
            ],
            "decisions": self.decisions(),
        }

    def decisions(self) -> dict[str, dict]:
        return {case: dataclasses.asdict(decision) for case, decision in read_decisions(self.review_file, self.run.case_ids).items()}

    def record(self, case: str, decision: str, style: str, note: str, reviewer: str) -> dict[str, dict]:
        """Merge one decision into review.csv; every decision now in it (other tabs' too)."""
        if case not in self.cases:
            raise KeyError(case)
        recorded = record_decision(self.review_file, new_decision(case, decision, style, note, reviewer or self.reviewer))
        return {name: dataclasses.asdict(made) for name, made in recorded.items()}

    def volumes(self, case_id: str) -> CaseVolumes:
        """The case's volumes, read once and kept for the last few cases."""
        with self._lock:
            if case_id in self._volumes:
                self._volumes.move_to_end(case_id)
                return self._volumes[case_id]
            volumes = read_volumes(self.cases[case_id], self.selection, self.dataset.declared_values)
            self._volumes[case_id] = volumes
            while len(self._volumes) > CACHED_CASES:
                self._volumes.popitem(last=False)
            return volumes

    def prediction(self, case_id: str, style: str) -> np.ndarray:
        """The style's class map of the case in RAS orientation, segmented on first request."""
        volumes = self.volumes(case_id)
        with self._lock:
            if style not in volumes.predictions:
                probabilities = latent_probabilities(self.run, self.styles[style])
                classes = segment(volumes.original, volumes.affine, probabilities, self.run.config.preprocess)
                volumes.predictions[style] = to_ras(classes, volumes.orientation)
            return volumes.predictions[style]

    def case_info(self, case_id: str) -> dict:
        volumes = self.volumes(case_id)
        return {"shape": list(volumes.image.shape), "spacing": volumes.spacing.tolist(), "window": list(volumes.window)}

    def slice_data(self, case_id: str, plane: str, index: int, style: str) -> dict:
        """One slice of the image, the given label and the style's prediction, downsampled, rows upwards."""
        volumes = self.volumes(case_id)
        axis = PLANES[plane]
        index = int(np.clip(index, 0, volumes.image.shape[axis] - 1))
        step = max(1, -(-max(side for dim, side in enumerate(volumes.image.shape) if dim != axis) // MAX_SLICE_SIDE))
        sections = [display_slice(volume, axis, index, step) for volume in (volumes.image, volumes.label, self.prediction(case_id, style))]
        across, up = (dim for dim in range(3) if dim != axis)
        return {
            "index": index,
            "rows": sections[0].shape[0],
            "columns": sections[0].shape[1],
            "pixel": [float(volumes.spacing[across] * step), float(volumes.spacing[up] * step)],
            "image": encoded(sections[0].astype("<f4")),
            "label": encoded(sections[1].astype(np.uint8)),
            "prediction": encoded(sections[2].astype(np.uint8)),
        }


def ranking_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run hsort analyze first")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"case", "cluster"} <= set(rows[0]):
        raise DataError(path, "needs a row per case with columns case and cluster (written by hsort analyze)")
    return rows


def read_volumes(case: Case, selection, declared_values) -> CaseVolumes:
    import nibabel.orientations as orientations

    volume = read_case(case, selection, declared_values)
    orientation = orientations.io_orientation(volume.affine)
    spacing = voxel_sizes(volume.affine)[orientation[:, 0].astype(int).argsort()]
    image, label = to_ras(volume.image, orientation), to_ras(volume.label, orientation)
    low, high = np.percentile(image[around_foreground(label > 0, label > 0, WINDOW_MARGIN)], (1, 99))  # the organ and what surrounds it
    return CaseVolumes(image, label, spacing, orientation, volume.affine, volume.image, (float(low), float(high)), {})


def to_ras(volume: np.ndarray, orientation: np.ndarray) -> np.ndarray:
    import nibabel.orientations as orientations

    return orientations.apply_orientation(volume, orientation)  # flips and a transpose: a view


def display_slice(volume: np.ndarray, axis: int, index: int, step: int) -> np.ndarray:
    """The plane `index` across `axis`, every `step`-th voxel, as rows (the higher remaining axis, upwards) by
    columns (the lower one, left to right): as report.html's pictures draw it."""
    section = np.take(volume, index, axis=axis)[::step, ::step]
    return np.ascontiguousarray(section.T[::-1])


def encoded(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# The server


class ReviewHandler(BaseHTTPRequestHandler):
    """GET / (the page), /api/cases, /api/decisions, /api/case, /api/slice; POST /api/decision. Nothing else exists."""

    session: ReviewSession  # set on the subclass `serve` makes
    server_version = "hsort-review"
    sys_version = ""

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        if not self.trusted(query.get("token")):
            return
        routes = {
            "/": self.send_page,
            "/api/cases": self.send_cases,
            "/api/decisions": self.send_decisions,
            "/api/case": self.send_case,
            "/api/slice": self.send_slice,
        }
        route = routes.get(url.path)
        if route is None:
            return self.refuse(HTTPStatus.NOT_FOUND, "no such page")
        try:
            route(query)
        except KeyError:
            self.refuse(HTTPStatus.NOT_FOUND, "no such case, plane or style")
        except (ValueError, DataError) as error:
            self.refuse(HTTPStatus.BAD_REQUEST, str(error))
        except OSError as error:  # a file of the dataset vanished or cannot be read: the page says so
            self.refuse(HTTPStatus.INTERNAL_SERVER_ERROR, describe_os_error(error))

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if not self.trusted(self.headers.get(TOKEN_HEADER)):
            return
        if url.path != "/api/decision":
            return self.refuse(HTTPStatus.NOT_FOUND, "no such page")
        length = self.headers.get("Content-Length", "")
        length = int(length) if length.isdigit() else 0
        if not 0 < length <= MAX_BODY_BYTES:
            return self.refuse(HTTPStatus.BAD_REQUEST, "a decision is a small JSON object")
        try:
            body = json.loads(self.rfile.read(length))
            fields = {name: str(body.get(name, "")) for name in ("case", "decision", "style", "note", "reviewer")}
            self.send_json({"decisions": self.session.record(**fields)})
        except KeyError:
            self.refuse(HTTPStatus.NOT_FOUND, "no such case")
        except (ValueError, AttributeError, DataError) as error:
            self.refuse(HTTPStatus.BAD_REQUEST, str(error))
        except OSError as error:  # review.csv cannot be written (a full disk, permissions): not saved, and the page says why
            self.refuse(HTTPStatus.INTERNAL_SERVER_ERROR, describe_os_error(error))

    def trusted(self, token: str | None) -> bool:
        """The token matches, the Host is this server's loopback address and a browser's Origin, if sent, is ours."""
        port = self.server.server_address[1]
        hosts = {f"{LOOPBACK}:{port}", f"localhost:{port}"}
        origin = self.headers.get("Origin")
        if self.headers.get("Host") not in hosts or (origin is not None and origin.removeprefix("http://") not in hosts):
            self.refuse(HTTPStatus.FORBIDDEN, "requests come from this machine's own page only")
            return False
        if token is None or not hmac.compare_digest(token.encode(), self.session.token.encode()):
            self.refuse(HTTPStatus.FORBIDDEN, "missing or wrong token: open the address hsort review printed")
            return False
        return True

    def send_page(self, query: dict) -> None:
        body = review_page(self.session.run.run_dir.name).encode()
        self.send_bytes(body, "text/html; charset=utf-8", {"Content-Security-Policy": page_policy()})

    def send_cases(self, query: dict) -> None:
        self.send_json(self.session.case_list())

    def send_decisions(self, query: dict) -> None:
        self.send_json({"decisions": self.session.decisions()})

    def send_case(self, query: dict) -> None:
        self.send_json(self.session.case_info(query["case"]))

    def send_slice(self, query: dict) -> None:
        style = query.get("style", MAIN_STYLE)
        if style not in self.session.styles:
            raise KeyError(style)
        self.send_json(self.session.slice_data(query["case"], query["plane"] if query.get("plane") in PLANES else "", int(query.get("index", "0")), style))

    def send_json(self, data: dict) -> None:
        self.send_bytes(json.dumps(data).encode(), "application/json")

    def send_bytes(self, body: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")  # the token stays in this page's address
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def refuse(self, status: HTTPStatus, reason: str) -> None:
        body = json.dumps({"error": reason}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        """Quiet: every slice is a request."""


def serve(session: ReviewSession, port: int = 0) -> ThreadingHTTPServer:
    """A server for the session on 127.0.0.1 (port 0: any free one), not yet serving."""
    handler = type("SessionHandler", (ReviewHandler,), {"session": session})
    try:
        server = ThreadingHTTPServer((LOOPBACK, port), handler)
    except OSError as error:
        error.filename = f"{LOOPBACK}:{port}"  # the address a port in use or a forbidden port is reported with
        raise
    server.daemon_threads = True
    return server


def page_url(server: ThreadingHTTPServer, session: ReviewSession) -> str:
    return f"http://{LOOPBACK}:{server.server_address[1]}/?token={session.token}"


# ---------------------------------------------------------------------------------------------
# The page


def page_policy() -> str:
    return f"default-src 'none'; connect-src 'self'; img-src data:; style-src 'unsafe-inline'; script-src '{script_hash(SLICE_VIEWER_SCRIPT)}' '{script_hash(REVIEW_SCRIPT)}'; base-uri 'none'; form-action 'none'"


def review_page(run_name: str) -> str:
    from hypersort_core.report import escape

    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">'
        f"<title>review · {escape(run_name)}</title><style>{REVIEW_STYLE}</style></head>\n"
        f"<body>{REVIEW_BODY}<script>{SLICE_VIEWER_SCRIPT}</script><script>{REVIEW_SCRIPT}</script></body></html>\n"
    )


REVIEW_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;color:#222;margin:0;display:flex;height:100vh}
#list{width:300px;overflow:auto;border-right:1px solid #ccc;padding:.5em;flex:none}
#list label{display:block;margin:.2em 0}#cases{list-style:none;padding:0;margin:.5em 0}
#cases li{padding:2px 4px;cursor:pointer;border-radius:3px;word-break:break-all;font-size:13px}
#cases li.current{background:#ffe7a0}#cases li .d{float:right;font-size:11px;color:#666}
#main{flex:1;overflow:auto;padding:.5em 1em}
#row{display:flex;gap:1.5em;flex-wrap:wrap;align-items:flex-start}#map-box{margin:0;width:300px}#map{border:1px solid #ccc}
#views{display:flex;gap:.8em;flex-wrap:wrap;align-items:flex-start;flex:0 1 auto}
.view{display:flex;flex-direction:column;gap:.2em}.view canvas{background:#000;image-rendering:pixelated;cursor:ns-resize}
.view input{width:100%}
#tools label{margin-right:1em}#legend span{margin-right:1em}
#decide button{margin:.2em .3em .2em 0}#decide button.chosen{outline:3px solid #d62728}
#note{width:100%;max-width:640px;height:3em}
#map circle{stroke:#222;stroke-width:.5}#map circle.current{stroke:#d62728;stroke-width:3}
.meta{color:#555;font-size:12px}kbd{border:1px solid #999;border-radius:3px;padding:0 3px;font-size:11px}
#status{color:#2a7;font-size:12px}
"""

REVIEW_BODY = """
<aside id="list">
<label>worst first by <select id="order"></select></label>
<label>cluster <select id="cluster"><option value="">all</option></select></label>
<label><input type="checkbox" id="undecided-only"> undecided only</label>
<p class="meta" id="progress"></p>
<ul id="cases"></ul>
</aside>
<main id="main">
<h2 id="case-title">loading…</h2>
<p class="meta" id="case-meta"></p>
<div id="tools">
<label>prediction of <select id="style"></select></label>
<label>window <select id="window">
<option value="auto">auto (1–99 % around the label)</option><option value="400,40">soft tissue (W 400, L 40)</option>
<option value="150,30">liver (W 150, L 30)</option><option value="1500,-600">lung (W 1500, L −600)</option>
<option value="1800,400">bone (W 1800, L 400)</option><option value="350,50">mediastinum (W 350, L 50)</option></select></label>
<label><input type="checkbox" id="show-label" checked> label</label>
<label><input type="checkbox" id="show-prediction" checked> prediction</label>
<span id="legend"><span style="color:#e6b800">■ given label</span><span style="color:#00a8e0">■ prediction</span></span>
</div>
<div id="decide">
<p><button data-decision="use_prediction"><kbd>1</kbd> wrong: use prediction (<span id="decide-style"></span>)</button>
<button data-decision="exclude"><kbd>2</kbd> wrong: exclude</button>
<button data-decision="hard_but_correct"><kbd>3</kbd> hard but correct</button>
<button data-decision="fine"><kbd>4</kbd> fine</button>
<button id="previous"><kbd>p</kbd> previous</button><button id="next"><kbd>n</kbd> next</button></p>
<textarea id="note" placeholder="note (saved with the decision)"></textarea>
<p class="meta">decision: <b id="decision">none</b> (a note edited later is saved with it) <span id="status"></span><br>
scroll a view (or drag its slider) to move through its slices; <kbd>1</kbd>–<kbd>4</kbd> decide, <kbd>n</kbd>/<kbd>p</kbd> next/previous case</p>
</div>
<div id="row"><div id="views"></div>
<figure id="map-box"><svg id="map" width="300" height="250" viewBox="0 0 360 300" role="img" aria-label="latent map"></svg>
<figcaption class="meta">latent map: this case ringed red, + λ = 0; click a point to open its case</figcaption></figure></div>
</main>
"""

REVIEW_SCRIPT = """
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const token = new URLSearchParams(location.search).get("token") || "";
  const state = {data: null, order: [], current: null, info: null, viewer: null};

  async function api(path, params) {
    const query = new URLSearchParams({...params, token});
    const response = await fetch(`${path}?${query}`);
    if (!response.ok) throw new Error((await response.json()).error);
    return response.json();
  }

  function decode(text, Type) {
    const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
    return new Type(bytes.buffer);
  }

  function worseFirst(column) {
    const sign = column.lowerIsWorse ? 1 : -1;
    return (a, b) => sign * (a.scores[column.name] - b.scores[column.name]);
  }

  function refreshOrder() {
    const data = state.data, column = data.columns.find((c) => c.name === $("order").value);
    const cluster = $("cluster").value, undecided = $("undecided-only").checked;
    let cases = data.cases.slice();
    if (column) cases.sort(worseFirst(column));
    if (cluster !== "") cases = cases.filter((c) => String(c.cluster) === cluster);
    if (undecided) cases = cases.filter((c) => !data.decisions[c.id] || c.id === state.current);
    state.order = cases.map((c) => c.id);
    const list = $("cases");
    list.replaceChildren();
    for (const [rank, c] of cases.entries()) {
      const item = document.createElement("li");
      item.dataset.case = c.id;
      item.textContent = `${rank + 1}. ${c.id}`;
      const decided = document.createElement("span");
      decided.className = "d";
      decided.textContent = data.decisions[c.id] ? data.decisionNames[data.decisions[c.id].decision] : "";
      item.append(decided);
      if (c.id === state.current) item.classList.add("current");
      item.addEventListener("click", () => show(c.id));
      list.append(item);
    }
    const done = data.cases.filter((c) => data.decisions[c.id]).length;
    $("progress").textContent = `${done} of ${data.cases.length} cases decided`;
  }

  function caseOf(id) { return state.data.cases.find((c) => c.id === id); }

  async function show(id) {
    if (!id) return;
    state.current = id;
    const c = caseOf(id);
    $("case-title").textContent = id;
    $("case-meta").textContent = `cluster ${c.cluster} · ` + Object.entries(c.scores).map(([k, v]) => `${k} ${v.toPrecision(3)}`).join(" · ") + (c.label ? ` · ${c.label}` : "");
    refreshOrder();
    showDecision();
    drawMap();
    const info = await api("/api/case", {case: id});
    if (state.current !== id) return;
    state.info = info;
    state.viewer = new SliceViewer($("views"), info.shape, sliceLoader(id), viewOptions());
  }

  function sliceLoader(id) {
    return async (plane, index) => {
      const slice = await api("/api/slice", {case: id, plane, index, style: $("style").value});
      return {...slice, pixels: decode(slice.image, Float32Array), labels: decode(slice.label, Uint8Array), predicted: decode(slice.prediction, Uint8Array)};
    };
  }

  function viewOptions() {
    const chosen = $("window").value;
    const [width, level] = chosen === "auto" ? [] : chosen.split(",").map(Number);
    const range = chosen === "auto" ? state.info.window : [level - width / 2, level + width / 2];
    const extent = Math.max(...state.info.shape.map((side, axis) => side * state.info.spacing[axis]));
    return {window: range, label: $("show-label").checked, prediction: $("show-prediction").checked, extent, size: 240};
  }

  function showDecision() {
    const decision = state.data.decisions[state.current];
    $("decision").textContent = decision ? state.data.decisionNames[decision.decision] + (decision.style ? ` (${decision.style})` : "") : "none";
    if (document.activeElement !== $("note")) $("note").value = decision ? decision.note : "";  // never under the curator's typing
    for (const button of document.querySelectorAll("#decide button[data-decision]")) {
      button.classList.toggle("chosen", Boolean(decision) && decision.decision === button.dataset.decision);
    }
  }

  async function decide(decision, style = $("style").value) {
    const id = state.current;
    const body = {case: id, decision, style: decision === "use_prediction" ? style : "", note: $("note").value, reviewer: state.data.reviewer};
    const response = await fetch("/api/decision", {method: "POST", headers: {"Content-Type": "application/json", "X-Review-Token": token}, body: JSON.stringify(body)});
    const answer = await response.json();
    if (!response.ok) { $("status").textContent = `not saved: ${answer.error}`; return; }
    state.data.decisions = answer.decisions;  // every tab's decisions, merged by the server
    $("status").textContent = `saved ${new Date().toLocaleTimeString()}`;
    if (state.current === id) showDecision();
    refreshOrder();
  }

  async function refreshDecisions() {
    state.data.decisions = (await api("/api/decisions", {})).decisions;
    showDecision();
    refreshOrder();
  }

  function move(by) {
    const at = state.order.indexOf(state.current);
    const next = state.order[Math.min(state.order.length - 1, Math.max(0, at + by))];
    if (next && next !== state.current) show(next);
  }

  function drawMap() {
    const svg = $("map"), cases = state.data.cases, W = 360, H = 300, M = 16;
    const xs = cases.map((c) => c.xy[0]), ys = cases.map((c) => c.xy[1]);
    const [x0, x1] = [Math.min(0, ...xs), Math.max(0, ...xs)], [y0, y1] = [Math.min(0, ...ys), Math.max(0, ...ys)];
    const px = (x) => M + ((x - x0) / (x1 - x0 || 1)) * (W - 2 * M), py = (y) => H - M - ((y - y0) / (y1 - y0 || 1)) * (H - 2 * M);
    const SVG = "http://www.w3.org/2000/svg";
    svg.replaceChildren();
    const origin = document.createElementNS(SVG, "path");
    origin.setAttribute("d", `M${px(0) - 6},${py(0)}h12M${px(0)},${py(0) - 6}v12`);
    origin.setAttribute("stroke", "#d62728");
    origin.setAttribute("stroke-width", "2");
    const current = [];
    for (const c of cases) {
      const point = document.createElementNS(SVG, "circle");
      point.setAttribute("cx", px(c.xy[0]));
      point.setAttribute("cy", py(c.xy[1]));
      point.setAttribute("r", c.id === state.current ? 7 : 4);
      point.setAttribute("fill", ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"][c.cluster % 6]);
      point.dataset.case = c.id;
      const title = document.createElementNS(SVG, "title");
      title.textContent = c.id;
      point.append(title);
      point.addEventListener("click", () => show(c.id));
      if (c.id === state.current) { point.classList.add("current"); current.push(point); } else svg.append(point);
    }
    svg.append(origin, ...current);  // drawn last: on top
  }

  function redrawAll() {
    if (!state.viewer) return;
    Object.assign(state.viewer.options, viewOptions());
    state.viewer.redraw();
  }

  async function start() {
    const data = await api("/api/cases", {});
    state.data = data;
    for (const column of data.columns) $("order").append(new Option(column.name, column.name));
    for (const cluster of [...new Set(data.cases.map((c) => c.cluster))].sort((a, b) => a - b)) $("cluster").append(new Option(`cluster ${cluster}`, cluster));
    for (const style of data.styles) $("style").append(new Option(style.name === "lambda0" ? "λ = 0 (main style)" : `${style.name} centroid`, style.name));
    $("decide-style").textContent = $("style").value;
    $("order").value = data.rankedBy;
    for (const id of ["order", "cluster", "undecided-only"]) $(id).addEventListener("change", refreshDecisions);
    window.addEventListener("focus", refreshDecisions);  // what other tabs decided meanwhile
    for (const select of document.querySelectorAll("select")) select.addEventListener("change", () => select.blur());  // keys decide again
    $("style").addEventListener("change", () => { $("decide-style").textContent = $("style").value; if (state.viewer) state.viewer.reload(); });
    for (const id of ["window", "show-label", "show-prediction"]) $(id).addEventListener("change", redrawAll);
    for (const button of document.querySelectorAll("#decide button[data-decision]")) button.addEventListener("click", () => decide(button.dataset.decision));
    $("note").addEventListener("change", () => {  // a note edited after the decision is saved with it
      const decided = state.data.decisions[state.current];
      if (decided) decide(decided.decision, decided.style);
    });
    $("next").addEventListener("click", () => move(1));
    $("previous").addEventListener("click", () => move(-1));
    document.addEventListener("keydown", (event) => {
      if (event.target instanceof HTMLTextAreaElement || event.target instanceof HTMLSelectElement || event.ctrlKey || event.metaKey || event.altKey) return;
      const decision = {"1": "use_prediction", "2": "exclude", "3": "hard_but_correct", "4": "fine"}[event.key];
      if (decision) decide(decision);
      else if (event.key === "n" || event.key === "j") move(1);
      else if (event.key === "p" || event.key === "k") move(-1);
      else return;
      event.preventDefault();
    });
    refreshOrder();
    const resume = state.order.find((id) => !data.decisions[id]) || state.order[0];  // where the curator stopped
    await show(resume);
  }

  start().catch((error) => { $("case-title").textContent = `cannot load the cases: ${error.message}`; });
})();
"""
