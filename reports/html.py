"""The report page: one self-contained HTML file of an evaluation (``latkit report``).

``render_html`` lays out an ``Evaluation`` (``reports.evaluation``), the figures of
``reports.plots.render_figures`` (PNG bytes, inlined as data URIs) and, when given, a
recalibration curve. Nothing is fetched: no script, stylesheet, font or image outside the
file, and everything reads without JavaScript (a few inline lines only make the tables
sortable). The evaluation itself is embedded as JSON (``<script type="application/json"
id="evaluation-json">``), the same object ``latkit evaluate --output-file`` writes.

``run_report`` is the command's one function: evaluate (as ``latkit evaluate``), draw the
figures (as ``latkit plot``), render, write atomically.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from reports.evaluation import (
    Evaluation,
    EvaluationRun,
    evaluate_checkpoint,
    jsonable,
    write_evaluation,
)
from reports.tables import (
    CURVE_KEYS,
    MISSING,
    TARGET_LABELS,
    Table,
    both_groups,
    calibration_table,
    checks_table,
    config_table,
    curve_table,
    format_value,
    headline_table,
    long_answers_table,
    mape_ratio_text,
    unprofiled_table,
    verdict_text,
)
from toolkit import __version__
from toolkit.atomic import write_text_atomic
from toolkit.errors import LatkitError

__all__ = ["FIGURE_CAPTIONS", "RecalibrationCurve", "ReportResult", "render_html", "run_report"]

#: What each figure of ``latkit plot`` shows, as the page captions it.
FIGURE_CAPTIONS: Final[dict[str, str]] = {
    "scatter_plots.png": "Prefill and decode time per pass, predicted against measured.",
    "error_distributions.png": "Distributions of the errors, absolute and relative.",
    "errors_by_tier.png": "Absolute percentage error by image tier.",
    "errors_by_topk.png": "Absolute percentage error by MoE top_k.",
    "errors_by_blocks.png": "Absolute percentage error by the number of active blocks.",
    "decode_total_scatter.png": "Decode total, predicted against measured, by decode passes.",
    "decode_pass_curve.png": "Time of decode pass k, measured against predicted (long answers "
    "in their own panel when the data has them).",
    "residuals_vs_output_tokens.png": "Decode residuals against the answer's length.",
    "calibration.png": "Observed against nominal coverage of every bound.",
    "unprofiled_configs.png": "MAPE of every configuration, profiled and never profiled.",
}

CURVE_FILE: Final[str] = "recalibration_curve.json"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
  color: #1d2329; background: #fafbfc; line-height: 1.45; }
header, main, footer { max-width: 1200px; margin: 0 auto; padding: 0 1.2rem; }
header { padding-top: 1.2rem; }
h1 { margin: 0.2rem 0; font-size: 1.6rem; }
h2 { margin-top: 2.2rem; border-bottom: 2px solid #d0d7de; padding-bottom: 0.2rem; }
h3 { margin-bottom: 0.4rem; }
nav a { margin-right: 0.9rem; white-space: nowrap; }
.meta { color: #57606a; margin: 0.2rem 0; }
table { border-collapse: collapse; margin: 0.4rem 0 1rem; background: white;
  font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.55rem; }
th { background: #f0f3f6; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.missing { text-align: center; color: #8c959f; }
table.sortable th { cursor: pointer; }
table.sortable th::after { content: " \\2195"; color: #8c959f; }
.warning { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px;
  padding: 0.5rem 0.8rem; margin: 0.5rem 0; }
.ok { color: #1a7f37; } .bad { color: #cf222e; }
figure { margin: 1.2rem 0; background: white; border: 1px solid #d0d7de; padding: 0.6rem; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: #57606a; margin-top: 0.3rem; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(440px, 1fr));
  gap: 0 2.5rem; }
.cards > div { min-width: 0; }
h4 { margin: 0.8rem 0 0.3rem; }
dl { display: grid; grid-template-columns: minmax(6rem, 15rem) minmax(0, 1fr);
  gap: 0.15rem 1rem; }
dt { color: #57606a; } dd { margin: 0; overflow-wrap: anywhere; }
footer { color: #57606a; padding-bottom: 2rem; margin-top: 2rem; }
"""

# Click a column header to sort by it (numbers by their full value, "n/a" last); a second
# click reverses. Without JavaScript the tables stay as they are, in their printed order.
_SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0];
      var up = th.getAttribute("aria-sort") !== "ascending";
      var key = function (row) {
        var cell = row.cells[column];
        var raw = cell.hasAttribute("data-value") ? cell.getAttribute("data-value") : null;
        return raw === null ? cell.textContent : (raw === "" ? null : parseFloat(raw));
      };
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) { return x === y ? 0 : (x === null ? 1 : -1); }
        var order = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
        return up ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
    });
  });
});
"""


@dataclass(frozen=True)
class RecalibrationCurve:
    """A recalibration curve to show: its rows, where they came from, its figure (PNG)."""

    source: str
    rows: list[dict[str, Any]]
    png: bytes


@dataclass(frozen=True)
class ReportResult:
    path: Path
    run: EvaluationRun  # the evaluation with the model and samples it was computed from
    n_bytes: int

    @property
    def evaluation(self) -> Evaluation:
        return self.run.evaluation


def _name(path: str | None) -> str:
    return Path(path).name if path else "?"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any, digits: int) -> str:
    text = _esc(format_value(value, digits))
    if isinstance(value, bool):
        return f'<td data-value="{int(value)}">{text}</td>'
    if isinstance(value, int | float):
        number = float(value)
        full = repr(value) if math.isfinite(number) else ""
        return f'<td class="num" data-value="{full}">{text}</td>'
    if value is None:
        return f'<td class="num" data-value="">{text}</td>'
    if value == MISSING:
        return f'<td class="missing" data-value="">{text}</td>'
    return f"<td>{text}</td>"


def table_html(table: Table, *, table_id: str | None = None, sortable: bool = False) -> str:
    """A ``Table`` as HTML; every number keeps its full value in ``data-value``."""
    attrs = f' id="{_esc(table_id)}"' if table_id else ""
    attrs += ' class="sortable"' if sortable else ""
    head = "".join(f'<th scope="col">{_esc(h)}</th>' for h in table.header)
    body = "\n".join(
        "<tr>" + "".join(_cell(v, table.digits[i]) for i, v in enumerate(row)) + "</tr>"
        for row in table.rows
    )
    return f"<table{attrs}><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>"


def _definitions(items: Sequence[tuple[str, Any]]) -> str:
    rows = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in items if v is not None)
    return f"<dl>{rows}</dl>"


def _png_img(name: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img id="img-{_esc(name)}" src="data:image/png;base64,{data}" alt="{_esc(alt)}">'


# -- sections ---------------------------------------------------------------------------------


def _warnings_section(result: Mapping[str, Any]) -> str:
    warnings = result.get("warnings") or []
    if not warnings:
        return ""
    items = "\n".join(
        f'<div class="warning" data-kind="{_esc(w["kind"])}">⚠ {_esc(w["message"])}</div>'
        for w in warnings
    )
    return f'<section id="warnings"><h2>Warnings</h2>\n{items}</section>'


def _model_card(result: Mapping[str, Any]) -> str:
    data = result.get("data", {})
    model = result.get("model", {})
    summary = model.get("training_summary", {})
    scored = [
        ("results directory", result.get("results_dir")),
        ("datasets", ", ".join(result.get("datasets") or data.get("datasets") or []) or None),
        ("samples scored", result["n_samples"]),
        ("configurations scored", result["n_configs"]),
        ("samples loaded", data.get("n_loaded_samples")),
        ("result files read", data.get("n_files")),
        ("held-out only: training samples dropped", result.get("n_dropped_training_samples")),
        ("training samples among those scored", result.get("n_training_samples_scored")),
        ("outliers filtered", result["n_filtered_outliers"]),
        ("decode passes per sample", "-".join(map(str, result["n_decode_passes_range"]))),
    ]
    skipped = {**data.get("skipped", {})}
    skipped.update({f"file: {k}": v for k, v in data.get("files_skipped", {}).items()})
    if data.get("n_files_failed"):
        skipped["file: could not be parsed"] = data["n_files_failed"]
    skipped_html = (
        table_html(Table(["reason", "records"], [[k, v] for k, v in skipped.items()], [0, 0]))
        if skipped
        else "<p>No record was skipped.</p>"
    )
    span = summary.get("output_tokens_range")
    trained = [
        ("checkpoint", result.get("checkpoint")),
        ("trained", model.get("created_utc")),
        ("training samples", summary.get("n_train")),
        ("early-stopping samples", summary.get("n_val")),
        ("calibration samples (bounds)", summary.get("n_calibration")),
        ("split", summary.get("split")),
        ("seed", summary.get("seed")),
        ("datasets", ", ".join(summary.get("datasets", [])) or None),
        ("configurations", summary.get("configs")),
        ("output tokens", f"{span[0]}-{span[1]}" if span else None),
    ]
    calibration = model.get("calibration") or {}
    if calibration.get("n_samples"):
        trained.append(
            (
                "recalibrated",
                f"{calibration.get('method')} on {calibration['n_samples']} target samples",
            )
        )
    ranges = summary.get("feature_ranges", {})
    ranges_html = (
        table_html(
            Table(
                ["feature", "min", "max"],
                [[name, float(low), float(high)] for name, (low, high) in ranges.items()],
                [0, 0, 0],
            )
        )
        if ranges
        else ""
    )
    model_versions = model.get("versions") or {}
    report_versions = result.get("versions", {})
    packages = list(dict.fromkeys([*model_versions, *report_versions]))
    versions = Table(
        ["package", "model trained with", "this report made with"],
        [[name, model_versions.get(name, ""), report_versions.get(name, "")] for name in packages],
        [0, 0, 0],
    )
    when = [
        ("model trained", model.get("created_utc")),
        ("evaluation made", result.get("created_utc")),
    ]
    return f"""<section id="model-card"><h2>Model card</h2>
<div class="cards">
<div><h3>Data scored</h3>{_definitions(scored)}
<h4>Skipped records, by reason</h4>{skipped_html}</div>
<div><h3>Training</h3>{_definitions(trained)}{ranges_html}</div>
<div><h3>Versions</h3>{table_html(versions)}
<h3>When</h3>{_definitions(when)}</div>
</div></section>"""


def _headline(result: Mapping[str, Any]) -> str:
    labels = {"prefill": "Prefill", "decode_total": "Decode total"}
    verdicts = "".join(
        f'<li class="{"ok" if v["ok"] else "bad"}">{_esc(verdict_text(labels[t], v))}</li>'
        for t, v in result.get("verdict", {}).items()
    )
    tables = "".join(
        f"<h3>{_esc(label.capitalize())}</h3>"
        + table_html(headline_table(result, target), table_id=f"headline-{target}")
        for target, label in TARGET_LABELS.items()
        if target in result
    )
    n_train = result.get("baselines_train_samples")
    note = (
        f"<p>Baselines fitted on {n_train} training samples; every model scored on the same "
        f"{result['n_samples']} samples.</p>"
        if "baselines" in result
        else "<p>No baselines (<code>--no-baselines</code>).</p>"
    )
    floor = result.get("noise_floor", {}).get("prefill", {})
    floor_note = (
        f"<p>Noise floor: the error a perfect model would make, from the {floor['n']} samples "
        f"in {floor['n_groups']} groups that repeat identical work. Bias: share of actuals at "
        "or below the prediction (0.5 = unbiased). Coverage: share of actuals at or below the "
        "bound.</p>"
        if floor.get("n")
        else ""
    )
    return f"""<section id="headline"><h2>Headline</h2>
<ul>{verdicts}</ul>{note}{tables}{floor_note}</section>"""


def _profiling(result: Mapping[str, Any]) -> str:
    profiling = both_groups(result)
    if profiling is None:
        if "profiling" in result:
            seen = result["profiling"]["profiled"]["n_samples"]
            text = (
                "Every configuration scored is in the model's training data."
                if seen
                else "No configuration scored is in the model's training data."
            )
        else:
            text = "The model carries no training data: profiled configurations are unknown."
        return (
            f'<section id="profiling"><h2>Profiled vs never-profiled configurations</h2>'
            f"<p>{_esc(text)}</p>{table_html(checks_table(result))}</section>"
        )
    ratio = profiling["mape_ratio"]
    never = unprofiled_table(result)
    return f"""<section id="profiling"><h2>Profiled vs never-profiled configurations</h2>
<p>Profiled: the configuration is in the model's training data. Never-profiled / profiled
MAPE: prefill {_esc(mape_ratio_text(ratio.get("prefill")))}, decode total
{_esc(mape_ratio_text(ratio.get("decode_total")))} (targets: 1.10x interpolation, 1.15x
sparse grid, 1.25x beyond the grid).</p>
{table_html(checks_table(result), table_id="profiling-checks")}
{table_html(never, table_id="profiling-models") if never.rows else ""}</section>"""


def _calibration(result: Mapping[str, Any], figures: Mapping[str, bytes]) -> str:
    link = (
        '<p>The figure <a href="#fig-calibration.png">calibration</a> draws the same.</p>'
        if "calibration.png" in figures
        else ""
    )
    if not result.get("coverage"):
        body = "<p>The model predicts no bounds.</p>"
    else:
        body = table_html(calibration_table(result), table_id="calibration-table")
    return f"""<section id="calibration"><h2>Calibration of the bounds</h2>
<p>Nominal against observed coverage (share of actuals at or below the bound) of every
bound.</p>{body}{link}</section>"""


def _long_answers(result: Mapping[str, Any]) -> str:
    block = result.get("long_answers")
    if not block:
        longest = result.get("model", {}).get("training_summary", {}).get("output_tokens_range")
        text = (
            f"No scored answer is longer than the longest the model was trained on "
            f"({longest[1]} output tokens)."
            if longest
            else "The model does not record the length of its training answers."
        )
        return f'<section id="long-answers"><h2>Long answers</h2><p>{_esc(text)}</p></section>'
    return f"""<section id="long-answers"><h2>Long answers</h2>
<p>Answers longer than any the model was trained on. Growth: whole-answer decode / decode of
the first {block["growth"]["passes"]} passes, predicted against measured, per sample.</p>
{table_html(long_answers_table(block), table_id="long-answers-table")}</section>"""


def _configs(result: Mapping[str, Any]) -> str:
    table = config_table(result)
    return f"""<section id="configs"><h2>Per-configuration errors</h2>
<p>{len(table.rows)} configurations (config = &lt;tier&gt;_&lt;top_k&gt;_&lt;active blocks&gt;),
by sample count; click a column to sort.</p>
{table_html(table, table_id="per-config", sortable=True)}</section>"""


def _figures(figures: Mapping[str, bytes]) -> str:
    items = "\n".join(
        f'<figure id="fig-{_esc(name)}">{_png_img(name, png, FIGURE_CAPTIONS.get(name, name))}'
        f"<figcaption>{_esc(name)}: {_esc(FIGURE_CAPTIONS.get(name, ''))}</figcaption></figure>"
        for name, png in figures.items()
    )
    return f'<section id="figures"><h2>Figures</h2>\n{items}</section>'


def _curve(curve: RecalibrationCurve | None) -> str:
    if curve is None:
        return ""
    image = _png_img("recalibration_curve.png", curve.png, "recalibration curve")
    return f"""<section id="recalibration"><h2>Recalibration curve</h2>
<p>From {_esc(curve.source)} (<code>latkit recalibrate --curve</code>): the error on held-out
target samples against the number N of calibration samples, every row scored on the same
samples.</p>
{table_html(curve_table(curve.rows), table_id="recalibration-table")}
<figure id="fig-recalibration_curve.png">{image}
<figcaption>recalibration_curve.png</figcaption></figure></section>"""


def render_html(
    result: Mapping[str, Any],
    figures: Mapping[str, bytes],
    curve: RecalibrationCurve | None = None,
) -> str:
    """The page (module doc) of ``result`` with ``figures`` (name -> PNG bytes)."""
    title = f"latkit report: {result.get('checkpoint', 'model')}"
    sections = [
        _warnings_section(result),
        _headline(result),
        _model_card(result),
        _profiling(result),
        _calibration(result, figures),
        _long_answers(result),
        _configs(result),
        _figures(figures),
        _curve(curve),
    ]
    names = {
        "warnings": "Warnings",
        "headline": "Headline",
        "model-card": "Model card",
        "profiling": "Profiled vs never",
        "calibration": "Calibration",
        "long-answers": "Long answers",
        "configs": "Configurations",
        "figures": "Figures",
        "recalibration": "Recalibration",
    }
    nav = " ".join(
        f'<a href="#{key}">{label}</a>'
        for key, label in names.items()
        if any(s.startswith(f'<section id="{key}"') for s in sections)
    )
    evaluation_json = json.dumps(jsonable(result), allow_nan=False).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<header>
<h1>Latency model report</h1>
<p class="meta">Model {_esc(_name(result.get("checkpoint")))} on
{_esc(_name(result.get("results_dir")))}: {result["n_samples"]} samples,
{result["n_configs"]} configurations; made {_esc(result.get("created_utc", ""))} by latkit
{_esc(__version__)} (full paths in the model card)</p>
<nav>{nav}</nav>
</header>
<main>
{"".join(section + chr(10) for section in sections if section)}
</main>
<footer>The numbers on this page are those of <code>latkit evaluate --output-file</code> for the
same inputs; the evaluation is embedded below as JSON (id <code>evaluation-json</code>).</footer>
<script type="application/json" id="evaluation-json">{evaluation_json}</script>
<script>{_SORT_SCRIPT}</script>
</body>
</html>
"""


# -- the command's one function ----------------------------------------------------------------


def load_curve(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``recalibration_curve.json``; a one-line error naming the file."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LatkitError(f"{path}: recalibration curve not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LatkitError(f"{path}: not a recalibration curve ({exc})") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise LatkitError(f"{path}: not a recalibration curve (expected a list of rows)")
    missing = sorted({k for r in rows for k in CURVE_KEYS if k not in r})
    if missing:
        raise LatkitError(f"{path}: recalibration curve rows lack {', '.join(missing)}")
    return rows


def curve_of(path: str | Path) -> RecalibrationCurve:
    """A recalibration curve file, with its figure drawn as ``latkit recalibrate`` draws it."""
    import polars as pl

    from toolkit.recalibrate import plot_curve

    rows = load_curve(path)
    with tempfile.TemporaryDirectory() as tmp:
        figure = Path(tmp) / "recalibration_curve.png"
        try:
            plot_curve(pl.DataFrame(rows), figure)
        except (pl.exceptions.PolarsError, ValueError, TypeError, IndexError) as exc:
            raise LatkitError(f"{path}: cannot draw the recalibration curve ({exc})") from None
        png = figure.read_bytes()
    return RecalibrationCurve(str(path), rows, png)


def run_report(
    checkpoint: str | Path,
    results_dir: str | Path,
    output_file: str | Path,
    *,
    dataset_names: Sequence[str] | None = None,
    use_all_datasets: bool = True,
    outlier_ms: float = 60.0,
    outlier_rel: float | None = None,
    held_out_only: bool = False,
    baselines: bool = True,
    recalibration_curve: str | Path | None = None,
    json_file: str | Path | None = None,
    figures_dir: str | Path | None = None,
    max_samples: int | None = 10000,
    single_network_epochs: int = 50,
    seed: int = 3407,
    device: str = "cpu",
) -> ReportResult:
    """Evaluate ``checkpoint`` on ``results_dir`` (as ``latkit evaluate``), draw the figures
    (as ``latkit plot``), and write the page to ``output_file``.

    ``recalibration_curve``: a ``recalibration_curve.json`` to show (default: the
    checkpoint's own, which ``latkit recalibrate --curve`` writes into a recalibrated model's
    directory). ``json_file`` / ``figures_dir``: also write the evaluation JSON / the PNG
    figures there (the same numbers and images as the page).
    """
    from reports.plots import render_figures, write_figures

    curve_path = Path(recalibration_curve) if recalibration_curve is not None else None
    if curve_path is None and (Path(checkpoint) / CURVE_FILE).is_file():
        curve_path = Path(checkpoint) / CURVE_FILE
    curve = curve_of(curve_path) if curve_path is not None else None
    run = evaluate_checkpoint(
        checkpoint,
        results_dir,
        dataset_names=dataset_names,
        use_all_datasets=use_all_datasets,
        outlier_ms=outlier_ms,
        outlier_rel=outlier_rel,
        baselines=baselines,
        held_out_only=held_out_only,
        single_network_epochs=single_network_epochs,
        seed=seed,
        device=device,
    )
    figures = render_figures(run.model, run.samples, run.steps, max_samples=max_samples)
    page = render_html(run.evaluation, figures, curve)
    write_text_atomic(output_file, page)
    if json_file is not None:
        write_evaluation(json_file, run.evaluation)
    if figures_dir is not None:
        write_figures(figures, figures_dir)
    return ReportResult(Path(output_file), run, len(page.encode("utf-8")))
