"""What `hsort analyze` writes from an analysis (analysis.py): ranking.csv, clusters.csv, the `cluster`
column of latents.csv, a slice picture per suspicious case, latent_map.png, and two self-contained pages,
latent_map.html (the interactive map) and report.html (the map, the styles and a worst-first gallery).

The pages work offline: CSS and JS are inline, the map's data is JSON in a script tag and every
picture a base64 PNG data URI; a Content-Security-Policy forbids any other source, so a page cannot
fetch anything even by mistake. Case ids and file names are untrusted text: they reach the HTML
escaped, the JSON with '<', '>' and '&' as \\u escapes (so '</script>' cannot end the script), and
the page's JS puts them into the DOM with textContent only.

A page opened with `#case=ID` (URL-encoded) shows that case as if its point had been clicked; the
gallery links to the map this way, and the browser test uses it.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import zlib
from pathlib import Path
from urllib.parse import quote

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import ndimage
from tqdm import tqdm

from hypersort_core.analysis import DESCRIPTIONS, GALLERY, Analysis, Clustering, analyze
from hypersort_core.atomic import atomic_savefig, atomic_write_csv, atomic_write_text
from hypersort_core.data import DataError, PreparedCase, scored_roi
from hypersort_core.data.volumes import voxel_sizes
from hypersort_core.latents import (
    LABELLED_OUTLIERS,
    drawable,
    map_plane,
    write_latents_csv,
)
from hypersort_core.main_style import main_style, prepared_training_cases
from hypersort_core.run import Run, load_run
from hypersort_core.run_folder import (
    CLUSTERS_NAME,
    LATENT_MAP_NAME,
    LATENT_MAP_PAGE_NAME,
    LATENTS_NAME,
    RANKING_NAME,
    REPORT_NAME,
)

# Slice pictures drawn, most suspicious first: each takes about 0.2 s on a CPU and 20 kB in the pages,
# so drawing every case of a dataset of thousands would take minutes for pictures nobody scrolls to.
PICTURES = 200
PRINTED_CASES = 10
LABEL_COLOUR = "#ffcc00"
PREDICTION_COLOUR = "#00c8ff"
PICTURE_DPI = 90
MAX_VIEW_SIDE = 96  # voxels a side of a volume embedded for the slice viewer (about 0.3 MB a case before deflating)


def cluster_colour(cluster: int) -> str:
    return to_hex(colormaps["tab10"](cluster % 10))


# ---------------------------------------------------------------------------------------------
# Pictures


def around_foreground(label: np.ndarray, prediction: np.ndarray, margin: int = 2) -> np.ndarray:
    """Both foregrounds grown by `margin` voxels: the window of grey values is set there, so the organ and
    the tissue that touches it keep their contrast instead of being flattened by air and bone."""
    union = label | prediction
    if not union.any():
        return np.ones_like(union)
    return ndimage.binary_dilation(union, iterations=margin)


def case_picture(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, spacing: np.ndarray, plane_names: tuple[str, str, str]) -> bytes:
    """PNG of three orthogonal slices through the label's centre, with the given label's and the
    λ = 0 prediction's foreground contours on the image; `spacing` keeps anisotropic voxels true to size."""
    image = np.asarray(image, dtype=np.float32)
    foregrounds = (np.asarray(label) > 0, np.asarray(prediction) > 0)
    centre = slice_centre(*foregrounds)
    low, high = np.percentile(image[around_foreground(*foregrounds)], (1, 99))
    figure = Figure(figsize=(7.2, 2.6), layout="constrained")
    for axis, fixed, name in zip(figure.subplots(1, 3), (2, 1, 0), plane_names):
        across, up = (dim for dim in range(3) if dim != fixed)
        section = image_slice(image, fixed, centre[fixed])
        axis.imshow(section, cmap="gray", vmin=low, vmax=high, origin="lower", interpolation="nearest", aspect=spacing[up] / spacing[across])
        for foreground, colour in zip(foregrounds, (LABEL_COLOUR, PREDICTION_COLOUR)):
            draw_contour(axis, image_slice(foreground, fixed, centre[fixed]), colour)
        axis.set_title(f"{drawable(name)}, {'xyz'[fixed]} = {centre[fixed]}", fontsize=8)
        axis.set_axis_off()
    legend = [Line2D([], [], color=LABEL_COLOUR, label="given label"), Line2D([], [], color=PREDICTION_COLOUR, label="λ = 0 prediction")]
    figure.legend(handles=legend, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PICTURE_DPI, bbox_inches="tight")
    return buffer.getvalue()


def case_view(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, spacing: np.ndarray, plane_names: tuple[str, str, str]) -> dict:
    """A case as report.html's slice viewer scrolls through it: the image in the pictures' window as bytes, the
    given label (bit 0) and the prediction (bit 1) as one byte a voxel, every `step`-th voxel so that no side
    exceeds MAX_VIEW_SIDE; deflated (the page inflates with the browser's DecompressionStream) and base64."""
    foregrounds = (np.asarray(label) > 0, np.asarray(prediction) > 0)
    low, high = np.percentile(np.asarray(image, dtype=np.float32)[around_foreground(*foregrounds)], (1, 99))
    step = max(1, -(-max(np.shape(image)) // MAX_VIEW_SIDE))
    sampled = (slice(None, None, step),) * 3
    grey = np.clip((np.asarray(image, dtype=np.float32)[sampled] - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)
    masks = (foregrounds[0][sampled] | (foregrounds[1][sampled] << 1)).astype(np.uint8)
    packed = (base64.b64encode(zlib.compress(np.ascontiguousarray(array).tobytes(), 6)).decode("ascii") for array in (grey, masks))
    return {
        "shape": list(grey.shape),
        "spacing": [float(size * step) for size in spacing],
        "names": [drawable(name) for name in plane_names],
        "image": next(packed),
        "masks": next(packed),
    }


def image_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The plane `index` across `axis`, rows along the higher remaining axis (drawn upwards)."""
    return np.take(volume, index, axis=axis).T


def slice_centre(label: np.ndarray, prediction: np.ndarray) -> tuple[int, int, int]:
    """The label's centre of mass; the prediction's where the label is empty; else the volume's centre."""
    for foreground in (label, prediction):
        if foreground.any():
            return tuple(int(c) for c in np.rint(np.argwhere(foreground).mean(axis=0)))
    return tuple(side // 2 for side in label.shape)


def draw_contour(axis, mask: np.ndarray, colour: str) -> None:
    if 0 < mask.sum() < mask.size:  # a contour needs both sides
        axis.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.2)


def plot_cluster_map(analysis: Analysis, path: Path) -> None:
    """latent_map.png: the latents coloured by cluster, λ = 0 marked, the most suspicious cases named."""
    xy, clustering = map_plane(analysis.latents), analysis.clustering
    figure = Figure(figsize=(6, 5))
    axis = figure.subplots()
    for cluster, size in enumerate(clustering.sizes):
        members = clustering.members == cluster
        axis.scatter(
            xy[members, 0], xy[members, 1], s=24, color=cluster_colour(cluster), edgecolors="k", linewidths=0.3, label=f"{analysis.style(cluster)} ({size})"
        )
    axis.scatter([0], [0], marker="+", color="red", s=120, label="λ = 0")
    for i in analysis.ranking[:LABELLED_OUTLIERS]:
        axis.annotate(drawable(analysis.case_ids[i]), xy[i], fontsize=7, xytext=(3, 3), textcoords="offset points", parse_math=False)
    axis.margins(0.18)  # room for the case names at the edges
    axis.set(
        xlabel="z0",
        ylabel="z1" if analysis.latents.shape[1] > 1 else "",
        aspect="equal",
        title=f"latent map: {len(clustering.centroids)} clusters ({clustering.method})",
    )
    axis.legend(loc="best", fontsize=8)
    atomic_savefig(path, figure)


# ---------------------------------------------------------------------------------------------
# `hsort analyze`: the analysis, then its files


def analyze_run(
    run_dir: Path | str,
    clusters: int | None = None,
    method: str = "gmm",
    gallery: int = GALLERY,
    device: str = "auto",
    progress: bool = True,
    pictures: int = PICTURES,
) -> Analysis:
    """Score, cluster and rank the cases of a run folder and write every analysis file into it.

    This is the whole of `hsort analyze`, and what `fit` calls when training ends.  The `pictures`
    most suspicious cases (and at least the gallery's) get a slice picture."""
    run = load_run(run_dir, device)
    return analyze_loaded_run(run, clusters, method, gallery, progress, pictures)


def analyze_loaded_run(
    run: Run, clusters: int | None = None, method: str = "gmm", gallery: int = GALLERY, progress: bool = True, pictures: int = PICTURES, out: Path | None = None
) -> Analysis:
    """`analyze_run` on a run already loaded; its files go to `out` (default: the run folder)."""
    prepared = prepared_training_cases(run, progress)
    analysis = analyze(run, prepared, clusters, method, gallery, progress)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        analysis.run_dir = out
    drawn = analysis.ranking[: max(pictures, gallery)]
    drawings, analysis.views = draw_cases(run, prepared, drawn, progress, viewed=set(analysis.ranking[:gallery].tolist()))
    for index, picture in zip(drawn, drawings):
        analysis.pictures[index] = picture
    write_analysis(analysis)
    return analysis


def draw_cases(
    run: Run, prepared: dict[str, PreparedCase], indices: np.ndarray, progress: bool = False, viewed: set[int] = frozenset()
) -> tuple[list[bytes], dict[int, dict]]:
    """A PNG per case (indices) of slices with the given label's and the λ = 0 prediction's contours; for the
    `viewed` cases also the volumes report.html's slice viewer scrolls through."""
    plane_names = ("axial", "coronal", "sagittal") if run.config.preprocess.reorient else ("x–y", "x–z", "y–z")
    pictures, views = [], {}
    for index in tqdm(indices, desc="pictures", unit="case", disable=not progress):
        case = prepared[run.case_ids[index]]
        image, label = scored_roi(case, run.config.preprocess)
        prediction = run.segment_prepared(image, main_style(run))
        pictures.append(case_picture(image, label, prediction, voxel_sizes(case.affine), plane_names))
        if index in viewed:
            views[int(index)] = case_view(image, label, prediction, voxel_sizes(case.affine), plane_names)
    return pictures, views


# ---------------------------------------------------------------------------------------------
# Files


def write_analysis(analysis: Analysis) -> None:
    files = analysis.files
    write_clusters_csv(analysis, files[CLUSTERS_NAME])
    write_ranking_csv(analysis, files[RANKING_NAME])
    add_cluster_column(analysis, files[LATENTS_NAME])
    plot_cluster_map(analysis, files[LATENT_MAP_NAME])
    write_pages(analysis, files[LATENT_MAP_PAGE_NAME], files[REPORT_NAME])


def write_clusters_csv(analysis: Analysis, path: Path) -> None:
    """cluster, style, main, size, centroid z0.., then the mean of every per-case column."""
    _write_records(path, analysis.cluster_records())


def write_ranking_csv(analysis: Analysis, path: Path) -> None:
    """Every case, most suspicious first: its scores, its cluster and where its label lives."""
    records = analysis.ranking_records()
    for record, i in zip(records, analysis.ranking):
        record["label"] = analysis.label_files[i]
    _write_records(path, records)


def add_cluster_column(analysis: Analysis, path: Path) -> None:
    """latents.csv with a `cluster` column (replaced if present), every other column kept."""
    if not path.is_file():
        write_latents_csv(analysis.run_dir, analysis.case_ids, analysis.latents)
    with open(path, newline="") as handle:
        header, *rows = list(csv.reader(handle))
    if "case" not in header:
        raise DataError(path, "has no 'case' column")
    case, kept = header.index("case"), [i for i, name in enumerate(header) if name != "cluster"]
    cluster_of = dict(zip(analysis.case_ids, analysis.clustering.members.tolist()))
    atomic_write_csv(path, [[header[i] for i in kept] + ["cluster"], *[[row[i] for i in kept] + [cluster_of.get(row[case], "")] for row in rows]])


def _write_records(path: Path, records: list[dict]) -> None:
    """Records as CSV rows, numbers to 6 significant digits."""
    rows = [list(records[0]), *[[_number(value) if isinstance(value, float) else value for value in record.values()] for record in records]]
    atomic_write_csv(path, rows)


def _number(value: float) -> str:
    return f"{value:.6g}"


# ---------------------------------------------------------------------------------------------
# What `hsort analyze` prints


def format_summary(analysis: Analysis, cases: int = PRINTED_CASES) -> str:
    """The clusters, the most suspicious cases and the files written."""
    clustering, columns = analysis.clustering, analysis.columns
    lines = [
        f"{len(clustering.centroids)} clusters ({clustering.method}), {how_chosen(clustering)}",
        f"  {'style':<9}{'size':>5}  {'centroid':<20}" + "".join(f"{name:>14}" for name in columns),
    ]
    for cluster, (size, centroid) in enumerate(zip(clustering.sizes, clustering.centroids)):
        members = clustering.members == cluster
        centre = "(" + ", ".join(f"{value:.3g}" for value in centroid) + ")"
        lines.append(f"  {analysis.style(cluster):<9}{size:>5}  {centre:<20}" + "".join(f"{values[members].mean():>14.4g}" for values in columns.values()))
    lines += [
        "",
        f"most suspicious cases (by {DESCRIPTIONS[analysis.ranked_by]}; all {len(analysis.case_ids)} in {RANKING_NAME}):",
        f"  {'rank':>4}  {'case':<24}{'style':<9}" + "".join(f"{name:>14}" for name in columns),
    ]
    for rank, i in enumerate(analysis.ranking[:cases], start=1):
        style = analysis.style(int(clustering.members[i]))
        lines.append(f"  {rank:>4}  {analysis.case_ids[i]:<24}{style:<9}" + "".join(f"{values[i]:>14.4g}" for values in columns.values()))
    lines += ["", "files:", *[f"  {path}" for path in analysis.files.values()]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Pages


def write_pages(analysis: Analysis, map_path: Path, report_path: Path) -> None:
    atomic_write_text(map_path, latent_map_page(analysis))
    atomic_write_text(report_path, report_page(analysis))


def latent_map_page(analysis: Analysis) -> str:
    return page(f"latent map · {analysis.run_dir.name}", f"<h1>Latent map of {escape(analysis.run_dir)}</h1>{run_summary(analysis)}{map_section(analysis)}")


def report_page(analysis: Analysis) -> str:
    flagged = analysis.ranking[: analysis.gallery]
    return page(
        f"review · {analysis.run_dir.name}",
        f"<h1>Review of {escape(analysis.run_dir)}</h1>{run_summary(analysis)}"
        f"<h2>Latent map</h2>{map_section(analysis)}"
        f"<h2>Styles</h2>{styles_table(analysis)}"
        f"<h2>Worst first: the {len(flagged)} most suspicious cases</h2>"
        f'<div class="gallery">{"".join(gallery_figure(analysis, i, rank) for rank, i in enumerate(flagged, start=1))}</div>'
        f'<script type="application/json" id="view-data">{script_json({str(i): view for i, view in analysis.views.items()})}</script>'
        f"<script>{SLICE_VIEWER_SCRIPT}</script><script>{GALLERY_SCRIPT}</script>",
    )


def page(title: str, body: str) -> str:
    scripts = " ".join(f"'{script_hash(script)}'" for script in (MAP_SCRIPT, SLICE_VIEWER_SCRIPT, GALLERY_SCRIPT))
    policy = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src {scripts}"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body>{body}</body></html>\n"
    )


def run_summary(analysis: Analysis) -> str:
    clustering = analysis.clustering
    return (
        f'<p class="meta">{len(analysis.case_ids)} training cases of {escape(analysis.data)}; '
        f"{len(clustering.centroids)} clusters ({escape(clustering.method)}, {how_chosen(clustering)}); "
        f"cases ranked by {escape(analysis.describe(analysis.ranked_by))}; the main style is the cluster that holds λ = 0.</p>"
    )


def how_chosen(clustering: Clustering) -> str:
    return "fixed by --clusters" if clustering.chosen_by == "fixed" else "chosen by a Dirichlet-process mixture"


def map_section(analysis: Analysis) -> str:
    """The interactive map: an SVG scatter drawn by MAP_SCRIPT from the JSON beside it."""
    return (
        '<section id="map-section"><div class="map-tools"><label>colour by <select id="colour-by"></select></label> '
        '<button id="zoom-in" title="zoom in">+</button><button id="zoom-out" title="zoom out">−</button>'
        '<button id="zoom-reset">reset</button> <span class="hint">wheel: zoom · drag: pan · click a point: its slices</span></div>'
        '<div class="map-row"><div><svg id="map" width="560" height="440" viewBox="0 0 560 440" role="img" aria-label="latent map"></svg><div id="legend"></div></div>'
        '<aside id="panel"><h3 id="panel-caption">Click a point to see its case.</h3><p id="panel-style"></p>'
        '<img id="panel-picture" alt="" hidden><p id="panel-note" class="meta"></p><table id="panel-scores"></table><p id="panel-label" class="file"></p></aside></div>'
        '<div id="tip" hidden></div></section>'
        f'<script type="application/json" id="map-data">{script_json(map_data(analysis))}</script>'
        f"<script>{MAP_SCRIPT}</script>"
    )


def map_data(analysis: Analysis) -> dict:
    xy, clustering, columns = map_plane(analysis.latents), analysis.clustering, analysis.columns
    rank = np.empty(len(analysis.case_ids), dtype=int)
    rank[analysis.ranking] = np.arange(1, len(rank) + 1)
    return {
        "axes": ["z0", "z1" if analysis.latents.shape[1] > 1 else ""],
        "columns": [{"name": name, "label": analysis.describe(name)} for name in columns],
        "styles": [{"name": analysis.style(k), "size": int(size), "colour": cluster_colour(k)} for k, size in enumerate(clustering.sizes)],
        "cases": [
            {
                "id": case_id,
                "x": float(xy[i, 0]),
                "y": float(xy[i, 1]),
                "cluster": int(clustering.members[i]),
                "rank": int(rank[i]),
                "label": analysis.label_files[i],
                "values": [float(values[i]) for values in columns.values()],
                "picture": data_uri(analysis.pictures[i]) if analysis.pictures[i] else None,
            }
            for i, case_id in enumerate(analysis.case_ids)
        ],
    }


def styles_table(analysis: Analysis) -> str:
    clustering, columns = analysis.clustering, analysis.columns
    head = "".join(f"<th>{escape(analysis.describe(name))}</th>" for name in columns)
    rows = []
    for cluster, (size, centroid) in enumerate(zip(clustering.sizes, clustering.centroids)):
        members = clustering.members == cluster
        swatch = f'<span class="swatch" style="background:{cluster_colour(cluster)}"></span>'
        means = "".join(f"<td>{values[members].mean():.3g}</td>" for values in columns.values())
        centre = ", ".join(f"{value:.3g}" for value in centroid)
        rows.append(f"<tr><td>{swatch}{escape(analysis.style(cluster))}</td><td>{cluster}</td><td>{size}</td><td>({centre})</td>{means}</tr>")
    return f'<table class="styles"><tr><th>style</th><th>cluster</th><th>cases</th><th>centroid</th>{head}</tr>{"".join(rows)}</table><p class="meta">Score columns are means over the cluster\'s cases.</p>'


def gallery_figure(analysis: Analysis, i: int, rank: int) -> str:
    case_id, cluster = analysis.case_ids[i], int(analysis.clustering.members[i])
    scores = " · ".join(f"{escape(analysis.describe(name))} {values[i]:.3g}" for name, values in analysis.columns.items() if name != "dice_lambda0")
    return (
        f'<figure><figcaption><span class="rank">#{rank}</span> <b>{escape(case_id)}</b> · {escape(analysis.style(cluster))} · '
        f"{escape(analysis.describe('dice_lambda0'))} {analysis.dice[i]:.3f} · "
        f'<a href="#case={escape(quote(case_id, safe=""))}">show on the map</a><div>{scores}</div>'
        f'<div class="file">{escape(analysis.label_files[i])}</div></figcaption>'
        f'<img src="{data_uri(analysis.pictures[i])}" alt="slices of {escape(case_id)}">{viewer_controls(analysis, i)}</figure>'
    )


def viewer_controls(analysis: Analysis, i: int) -> str:
    """A button that swaps the picture for the slice viewer, where the case's volumes are embedded."""
    if i not in analysis.views:
        return ""
    return f'<button class="open-viewer" data-view="{i}">scroll through every slice</button><div class="viewer" id="viewer-{i}"></div>'


def escape(text) -> str:
    return html.escape(str(text), quote=True)


def script_json(data: dict) -> str:
    """JSON that is safe inside a <script> element: no '<', '>' or '&' survives as itself."""
    return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def script_hash(script: str) -> str:
    """The CSP source that allows exactly this inline script (and so no injected one)."""
    return "sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode("ascii")


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;color:#222;max-width:1180px;margin:1.2em auto;padding:0 1em}
h1{font-size:1.35em;word-break:break-all}h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ddd}
.meta{color:#555}.hint{color:#777;font-size:12px}.file{font:11px monospace;color:#666;word-break:break-all}
.map-tools{margin:.4em 0}.map-tools button{min-width:2.2em}
.map-row{display:flex;gap:1em;align-items:flex-start;flex-wrap:wrap}
#map{border:1px solid #ccc;background:#fff;cursor:grab;touch-action:none;user-select:none;max-width:100%;height:auto}
#map .frame{fill:none;stroke:#999}#map .grid{stroke:#eee}#map .zero{stroke:#aaa;stroke-dasharray:4 3}
#map text{font-size:10px;fill:#555}#map .origin{stroke:#d62728;stroke-width:2}
#map .point{stroke:#222;stroke-width:.6;cursor:pointer}#map .point:hover{stroke-width:2}
#map .point.selected{stroke:#d62728;stroke-width:2.5}
#legend{display:flex;gap:.8em;flex-wrap:wrap;align-items:center;font-size:12px;margin-top:.3em}
#legend .key::before,.swatch{content:"";display:inline-block;width:10px;height:10px;border-radius:50%;border:1px solid #222;margin-right:4px;background:var(--colour)}
#legend .ramp{width:120px;height:10px;background:linear-gradient(90deg,#440154,#3b528b,#21918c,#5ec962,#fde725)}
#panel{flex:1;min-width:320px}#panel h3{margin:.2em 0;word-break:break-all}#panel img{max-width:100%;border:1px solid #ccc}
#panel th{text-align:left;font-weight:normal;color:#555;padding-right:1em}
#tip{position:absolute;pointer-events:none;background:#fffffff2;border:1px solid #999;padding:4px 6px;font-size:12px;box-shadow:0 1px 4px #0003}
table.styles{border-collapse:collapse}table.styles td,table.styles th{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}
table.styles td:first-child{text-align:left;white-space:nowrap}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:1em}
.gallery figure{margin:0;border:1px solid #ddd;padding:.5em}.gallery img{width:100%}.gallery b{word-break:break-all}
.rank{color:#d62728;font-weight:bold}
.viewer{display:flex;gap:.6em;flex-wrap:wrap}.viewer .view{display:flex;flex-direction:column;font-size:12px}
.viewer canvas{background:#000;image-rendering:pixelated;cursor:ns-resize}
"""

MAP_SCRIPT = """
(() => {
  "use strict";
  const data = JSON.parse(document.getElementById("map-data").textContent);
  const SVG = "http://www.w3.org/2000/svg", W = 560, H = 440, M = 34;
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const $ = (id) => document.getElementById(id);
  const svg = $("map"), tip = $("tip"), colourBy = $("colour-by"), legend = $("legend");
  const format = (value) => String(Number(Number(value).toPrecision(3)));

  function svgNode(name, attributes, parent) {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
    parent.appendChild(node);
    return node;
  }
  function textNode(tag, text, parent, className) {
    const node = document.createElement(tag);
    node.textContent = text;
    if (className) node.className = className;
    parent.appendChild(node);
    return node;
  }

  // The view: the data point at the plot's centre and data units per pixel, the same on both axes.
  function fullView() {
    const xs = data.cases.map((c) => c.x).concat(0), ys = data.cases.map((c) => c.y).concat(0);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const scale = 1.2 * Math.max((x1 - x0) / (W - 2 * M), (y1 - y0) / (H - 2 * M)) || 0.01;
    return { cx: (x0 + x1) / 2, cy: (y0 + y1) / 2, scale };
  }
  let view = fullView();
  const toX = (x) => W / 2 + (x - view.cx) / view.scale;
  const toY = (y) => H / 2 - (y - view.cy) / view.scale;

  function ticks(low, high) {
    const raw = (high - low) / 5, power = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((f) => f * power).find((s) => s >= raw);
    const values = [];
    for (let t = Math.ceil(low / step) * step; t <= high; t += step) values.push(Number(t.toPrecision(12)));
    return values;
  }

  const axes = svgNode("g", {}, svg);
  svgNode("rect", { x: M, y: M, width: W - 2 * M, height: H - 2 * M }, svgNode("clipPath", { id: "plot-area" }, svg));
  const layer = svgNode("g", { "clip-path": "url(#plot-area)" }, svg);
  const origin = svgNode("path", { class: "origin" }, layer);
  const points = data.cases.map((c, i) => {
    const point = svgNode("circle", { r: 5, class: "point" }, layer);
    point.addEventListener("mouseenter", (event) => showTip(i, event));
    point.addEventListener("mousemove", moveTip);
    point.addEventListener("mouseleave", () => { tip.hidden = true; });
    point.addEventListener("click", () => { if (!dragged) show(i); });
    return point;
  });

  function render() {
    axes.replaceChildren();
    svgNode("rect", { x: M, y: M, width: W - 2 * M, height: H - 2 * M, class: "frame" }, axes);
    const half = [(W / 2 - M) * view.scale, (H / 2 - M) * view.scale];
    for (const t of ticks(view.cx - half[0], view.cx + half[0])) {
      svgNode("line", { x1: toX(t), x2: toX(t), y1: M, y2: H - M, class: t === 0 ? "zero" : "grid" }, axes);
      svgNode("text", { x: toX(t), y: H - M + 13, "text-anchor": "middle" }, axes).textContent = format(t);
    }
    for (const t of ticks(view.cy - half[1], view.cy + half[1])) {
      svgNode("line", { x1: M, x2: W - M, y1: toY(t), y2: toY(t), class: t === 0 ? "zero" : "grid" }, axes);
      svgNode("text", { x: M - 4, y: toY(t) + 3, "text-anchor": "end" }, axes).textContent = format(t);
    }
    svgNode("text", { x: W / 2, y: H - 4, "text-anchor": "middle" }, axes).textContent = data.axes[0];
    svgNode("text", { x: 10, y: H / 2, transform: `rotate(-90 10 ${H / 2})`, "text-anchor": "middle" }, axes).textContent = data.axes[1];
    origin.setAttribute("d", `M${toX(0) - 7},${toY(0)}h14M${toX(0)},${toY(0) - 7}v14`);
    points.forEach((point, i) => {
      point.setAttribute("cx", toX(data.cases[i].x));
      point.setAttribute("cy", toY(data.cases[i].y));
    });
  }

  function viridis(t) {
    const at = Math.min(Math.max(t, 0), 1) * (VIRIDIS.length - 1), k = Math.min(Math.floor(at), VIRIDIS.length - 2);
    const mix = VIRIDIS[k].map((v, j) => Math.round(v + (VIRIDIS[k + 1][j] - v) * (at - k)));
    return `rgb(${mix.join(",")})`;
  }
  function recolour() {
    legend.replaceChildren();
    if (colourBy.value === "cluster") {
      points.forEach((point, i) => point.setAttribute("fill", data.styles[data.cases[i].cluster].colour));
      for (const style of data.styles) textNode("span", `${style.name} (${style.size})`, legend, "key").style.setProperty("--colour", style.colour);
      return;
    }
    const column = Number(colourBy.value), values = data.cases.map((c) => c.values[column]);
    const low = Math.min(...values), high = Math.max(...values);
    points.forEach((point, i) => point.setAttribute("fill", viridis((values[i] - low) / (high - low || 1))));
    textNode("span", format(low), legend);
    textNode("span", "", legend, "ramp");
    textNode("span", `${format(high)}  ${data.columns[column].label}`, legend);
  }

  function describe(i) {
    const c = data.cases[i];
    return [`${data.styles[c.cluster].name} (cluster ${c.cluster}) · rank ${c.rank} of ${data.cases.length}`,
      ...data.columns.map((column, k) => `${column.label}: ${format(c.values[k])}`)];
  }
  function showTip(i, event) {
    tip.replaceChildren();
    textNode("b", data.cases[i].id, tip);
    for (const line of describe(i)) textNode("div", line, tip);
    tip.hidden = false;
    moveTip(event);
  }
  function moveTip(event) {
    tip.style.left = `${event.pageX + 14}px`;
    tip.style.top = `${event.pageY + 14}px`;
  }
  function show(i) {
    const c = data.cases[i], [style, ...scores] = describe(i), picture = $("panel-picture");
    points.forEach((point, k) => point.classList.toggle("selected", k === i));
    $("panel-caption").textContent = c.id;
    $("panel-style").textContent = style;
    picture.hidden = !c.picture;
    if (c.picture) {
      picture.src = c.picture;
      picture.alt = `slices of ${c.id}`;
    }
    $("panel-note").textContent = c.picture ? "" : "No picture: only the most suspicious cases get one (hsort analyze --pictures N).";
    const table = $("panel-scores");
    table.replaceChildren();
    for (const line of scores) {
      const row = document.createElement("tr"), split = line.lastIndexOf(": ");
      textNode("th", line.slice(0, split), row);
      textNode("td", line.slice(split + 2), row);
      table.appendChild(row);
    }
    $("panel-label").textContent = `label: ${c.label}`;
  }

  function zoom(factor, px = W / 2, py = H / 2) {
    const x = view.cx + (px - W / 2) * view.scale, y = view.cy - (py - H / 2) * view.scale;  // stays under the cursor
    view.scale *= factor;
    view.cx = x - (px - W / 2) * view.scale;
    view.cy = y + (py - H / 2) * view.scale;
    render();
  }
  function svgPoint(event) {
    const box = svg.getBoundingClientRect();
    return [(event.clientX - box.left) * W / box.width, (event.clientY - box.top) * H / box.height];
  }
  let drag = null, dragged = false;
  svg.addEventListener("wheel", (event) => { event.preventDefault(); zoom(event.deltaY < 0 ? 1 / 1.2 : 1.2, ...svgPoint(event)); }, { passive: false });
  svg.addEventListener("pointerdown", (event) => { drag = { start: svgPoint(event), cx: view.cx, cy: view.cy }; dragged = false; });
  window.addEventListener("pointermove", (event) => {
    if (!drag) return;
    const [px, py] = svgPoint(event), dx = px - drag.start[0], dy = py - drag.start[1];
    dragged = dragged || Math.hypot(dx, dy) > 3;
    if (!dragged) return;
    view.cx = drag.cx - dx * view.scale;
    view.cy = drag.cy + dy * view.scale;
    tip.hidden = true;
    render();
  });
  window.addEventListener("pointerup", () => { drag = null; });
  $("zoom-in").addEventListener("click", () => zoom(1 / 1.5));
  $("zoom-out").addEventListener("click", () => zoom(1.5));
  $("zoom-reset").addEventListener("click", () => { view = fullView(); render(); });

  colourBy.append(new Option("cluster", "cluster"), ...data.columns.map((column, k) => new Option(column.label, String(k))));
  colourBy.addEventListener("change", recolour);

  function openFromHash() {  // #case=ID shows that case as a click on its point would
    const match = /^#case=(.*)$/.exec(location.hash);
    let id = null;
    try { id = match && decodeURIComponent(match[1]); } catch { return; }
    const i = data.cases.findIndex((c) => c.id === id);
    if (i < 0) return;
    points[i].dispatchEvent(new MouseEvent("click", { bubbles: true }));
    $("map-section").scrollIntoView();
  }
  window.addEventListener("hashchange", openFromHash);
  recolour();
  render();
  openFromHash();
})();
"""

SLICE_VIEWER_SCRIPT = """
(() => {
  "use strict";
  // Three planes of a volume, each scrollable through every slice (wheel or slider), with the given label's and a
  // prediction's outlines. `load(plane, index)` resolves to a slice: {index, rows, columns, pixel: [width, height]
  // in mm, pixels, labels, predicted} (rows upwards); the review page fetches slices, report.html cuts them from
  // volumes embedded in it.
  const PLANES = ["axial", "coronal", "sagittal"], AXIS = {axial: 2, coronal: 1, sagittal: 0};
  const COLOURS = {label: [230, 184, 0], prediction: [0, 168, 224]};

  function element(tag, className, id) {
    const made = document.createElement(tag);
    if (className) made.className = className;
    if (id) made.id = id;
    return made;
  }

  class SliceViewer {
    constructor(container, shape, load, options = {}) {
      this.shape = shape;
      this.load = load;
      // size: screen pixels of the volume's longest side (in mm: extent), the same scale in all three planes
      this.options = {window: [0, 255], label: true, prediction: true, size: 300, extent: Math.max(...shape), prefix: "", names: PLANES, ...options};
      this.index = {};
      this.slices = {};
      this.tickets = {};
      this.parts = {};
      container.replaceChildren();
      for (const [k, plane] of PLANES.entries()) {
        const prefix = this.options.prefix, box = element("div", "view", `${prefix}view-${plane}`);
        const caption = element("span", "caption", `${prefix}caption-${plane}`), canvas = element("canvas", "", `${prefix}canvas-${plane}`);
        const slider = element("input", "", `${prefix}slider-${plane}`);
        slider.type = "range";
        slider.min = 0;
        slider.max = shape[AXIS[plane]] - 1;
        slider.addEventListener("input", () => this.go(plane, Number(slider.value)));
        canvas.addEventListener("wheel", (event) => { event.preventDefault(); this.go(plane, this.index[plane] + (event.deltaY > 0 ? 1 : -1)); }, {passive: false});
        box.append(caption, canvas, slider);
        container.append(box);
        this.parts[plane] = {caption, canvas, slider, name: this.options.names[k]};
        this.index[plane] = Math.floor(shape[AXIS[plane]] / 2);
      }
      this.reload();
    }

    reload() { for (const plane of PLANES) this.go(plane, this.index[plane]); }

    redraw() { for (const plane of PLANES) this.draw(plane); }

    async go(plane, index) {
      this.index[plane] = Math.min(this.shape[AXIS[plane]] - 1, Math.max(0, index));
      const ticket = (this.tickets[plane] || 0) + 1;
      this.tickets[plane] = ticket;
      const slice = await this.load(plane, this.index[plane]);
      if (this.tickets[plane] !== ticket) return;  // a newer slice was asked for meanwhile
      this.slices[plane] = slice;
      this.draw(plane);
    }

    draw(plane) {
      const slice = this.slices[plane], part = this.parts[plane];
      if (!slice) return;
      const {rows, columns} = slice, canvas = part.canvas, scale = this.options.size / this.options.extent;
      canvas.width = columns;
      canvas.height = rows;
      canvas.style.width = `${columns * slice.pixel[0] * scale}px`;
      canvas.style.height = `${rows * slice.pixel[1] * scale}px`;
      const context = canvas.getContext("2d"), picture = context.createImageData(columns, rows);
      const [low, high] = this.options.window, span = Math.max(high - low, 1e-6);
      for (let i = 0; i < rows * columns; i++) {
        const grey = Math.max(0, Math.min(255, (255 * (slice.pixels[i] - low)) / span));
        picture.data.set([grey, grey, grey, 255], 4 * i);
      }
      const outlines = [[this.options.label, slice.labels, COLOURS.label], [this.options.prediction, slice.predicted, COLOURS.prediction]];
      for (const [shown, mask, colour] of outlines) {
        if (!shown) continue;
        for (let r = 0; r < rows; r++) for (let c = 0; c < columns; c++) {
          const i = r * columns + c;
          if (!mask[i]) continue;
          const edge = r === 0 || c === 0 || r === rows - 1 || c === columns - 1 || !mask[i - 1] || !mask[i + 1] || !mask[i - columns] || !mask[i + columns];
          if (edge) picture.data.set([...colour, 255], 4 * i);
        }
      }
      context.putImageData(picture, 0, 0);
      part.slider.value = slice.index;
      part.caption.textContent = `${part.name} ${slice.index + 1} / ${this.shape[AXIS[plane]]}`;
    }
  }

  window.SliceViewer = SliceViewer;
})();
"""

GALLERY_SCRIPT = """
(() => {
  "use strict";
  // report.html's gallery: a case's embedded volumes, inflated on first use, cut into the slices SliceViewer draws.
  const views = JSON.parse(document.getElementById("view-data").textContent);
  const AXIS = {axial: 2, coronal: 1, sagittal: 0};

  async function inflate(text) {
    const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  function cutter(view, image, masks) {
    const [nx, ny, nz] = view.shape, strides = [ny * nz, nz, 1];
    return async (plane, index) => {
      const fixed = AXIS[plane], [across, up] = [0, 1, 2].filter((axis) => axis !== fixed);
      const columns = view.shape[across], rows = view.shape[up], size = rows * columns;
      const pixels = new Uint8Array(size), labels = new Uint8Array(size), predicted = new Uint8Array(size);
      for (let r = 0; r < rows; r++) for (let c = 0; c < columns; c++) {  // rows upwards, as the pictures and the review page
        const at = index * strides[fixed] + c * strides[across] + (rows - 1 - r) * strides[up];
        const i = r * columns + c;
        pixels[i] = image[at];
        labels[i] = masks[at] & 1;
        predicted[i] = masks[at] & 2;
      }
      return {index, rows, columns, pixel: [view.spacing[across], view.spacing[up]], pixels, labels, predicted};
    };
  }

  for (const button of document.querySelectorAll("button.open-viewer")) {
    button.addEventListener("click", async () => {
      const view = views[button.dataset.view], figure = button.closest("figure");
      const [image, masks] = await Promise.all([inflate(view.image), inflate(view.masks)]);
      button.hidden = true;
      figure.querySelector("img").hidden = true;
      new SliceViewer(document.getElementById(`viewer-${button.dataset.view}`), view.shape, cutter(view, image, masks),
                      {prefix: `v${button.dataset.view}-`, names: view.names, size: 160, extent: Math.max(...view.shape.map((side, axis) => side * view.spacing[axis]))});
    });
  }
})();
"""
