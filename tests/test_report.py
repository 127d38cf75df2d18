"""``latkit report``: one self-contained HTML page of the evaluation, checked as a file and in
a real browser (headless Chromium through Playwright; skipped where there is none)."""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from synthetic import fit_small_model, make_samples, write_results_dir

from reports.html import FIGURE_CAPTIONS
from reports.plots import FIGURE_NAMES

#: Where the browser test looks for Chromium (Debian's package; LATKIT_CHROMIUM overrides).
CHROMIUM = os.environ.get("LATKIT_CHROMIUM", "/usr/bin/chromium")
SECTIONS = (
    "model-card",
    "headline",
    "profiling",
    "calibration",
    "long-answers",
    "configs",
    "figures",
)


def _invoke(args: list[str]) -> tuple[int, str]:
    from click.testing import CliRunner

    from toolkit.cli import main

    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


#: A recalibration curve as ``latkit recalibrate --curve`` writes it.
CURVE_ROWS: list[dict[str, Any]] = [
    {
        "model": name,
        "n_samples": n,
        "prefill_mape_pct": mape,
        "prefill_r2": 0.9,
        "decode_total_mape_pct": mape + 1,
        "decode_total_r2": 0.8,
        "total_p95_coverage": 0.95,
    }
    for name, n, mape in (
        ("source (no recalibration)", 0, 40.0),
        ("affine recalibration", 10, 14.0),
        ("affine recalibration", 25, 12.0),
        ("target-trained (whole pool)", 200, 11.5),
    )
]


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small model (synthetic data, 2 epochs) carrying a recalibration curve (as a
    recalibrated checkpoint does), its report with the baselines on the data it was trained
    on, and ``latkit evaluate --output-file``'s JSON of the same inputs."""
    root = tmp_path_factory.mktemp("report")
    results, checkpoint = root / "results", root / "ckpt"
    fit_small_model(results, seed=11, n_estimators=30, val_fraction=0.25).save(checkpoint)
    (checkpoint / "recalibration_curve.json").write_text(json.dumps(CURVE_ROWS))
    page, evaluation = root / "report.html", root / "evaluation.json"
    selection = ["--checkpoint", str(checkpoint), "--results-dir", str(results)]
    code, text = _invoke(
        [
            "report",
            *selection,
            "--output-file",
            str(page),
            "--single-network-epochs",
            "1",
            "--json-file",
            str(root / "report.json"),
        ]
    )
    assert code == 0, text
    code, evaluate_text = _invoke(["evaluate", *selection, "--output-file", str(evaluation)])
    assert code == 0, evaluate_text
    return {
        "root": root,
        "results": results,
        "page": page,
        "text": text,
        "html": page.read_text(encoding="utf-8"),
        "evaluation": json.loads(evaluation.read_text()),
        "report_json": json.loads((root / "report.json").read_text()),
    }


def _embedded(html_text: str) -> dict[str, Any]:
    match = re.search(
        r'<script type="application/json" id="evaluation-json">(.*?)</script>', html_text, re.S
    )
    assert match is not None
    data: dict[str, Any] = json.loads(match.group(1))
    return data


def _section(html_text: str, name: str) -> str:
    return html_text.split(f'<section id="{name}">')[1].split("</section>")[0]


def test_report_is_one_self_contained_file(reported: dict[str, Any]) -> None:
    html_text = reported["html"]
    assert f"Report written to {reported['page']}" in reported["text"]
    # nothing outside the file: no external script, stylesheet, font or image, no URL at all
    assert not re.search(r"(src|href)\s*=\s*[\"'](?!data:|#)", html_text)
    assert "<link" not in html_text and "@import" not in html_text and "url(" not in html_text
    assert "http://" not in html_text and "https://" not in html_text
    images = re.findall(r'<img [^>]*src="([^"]+)"', html_text)
    assert len(images) == len(FIGURE_NAMES) + 1  # and the recalibration curve
    assert all(src.startswith("data:image/png;base64,iVBORw0KGgo") for src in images)
    for section in SECTIONS:
        assert f'<section id="{section}">' in html_text, section
    for name in FIGURE_NAMES:
        assert f'id="fig-{name}"' in html_text, name
        assert html.escape(FIGURE_CAPTIONS[name]) in html_text, name


def test_report_numbers_are_evaluate_s(reported: dict[str, Any]) -> None:
    """One computation, several views: the page's numbers are ``latkit evaluate``'s."""
    evaluation, embedded = reported["evaluation"], _embedded(reported["html"])
    for key in ("prefill", "decode_total", "total", "coverage", "bias", "per_config", "verdict"):
        assert embedded[key] == evaluation[key] == reported["report_json"][key], key
    assert list(embedded["baselines"]) == [
        "lookup_table",
        "linear",
        "single_network",
        "trees_only",
    ]
    mape = evaluation["prefill"]["mape_pct"]
    cell = f'<td class="num" data-value="{mape!r}">{mape:.2f}</td>'
    headline = reported["html"].split('id="headline-prefill"')[1].split("</table>")[0]
    assert cell in headline
    # every configuration is a row of the per-configuration table
    table = reported["html"].split('id="per-config"')[1].split("</table>")[0]
    assert table.count("<tr>") == len(evaluation["per_config"]) + 1  # + the header


def test_report_warns_about_training_samples(reported: dict[str, Any]) -> None:
    """Scored on the data it was trained on (no --held-out-only): said on stderr and on top
    of the page."""
    n = reported["evaluation"]["n_training_samples_scored"]
    assert n > 0
    assert f"⚠ {n} of the" in reported["text"]
    warnings = _section(reported["html"], "warnings")
    assert 'data-kind="training_samples"' in warnings and "--held-out-only" in warnings
    assert reported["html"].index('id="warnings"') < reported["html"].index('id="model-card"')


def test_report_recalibration_curve(reported: dict[str, Any], tmp_path: Path) -> None:
    # the checkpoint carries its curve: the report found it there
    section = _section(reported["html"], "recalibration")
    assert "recalibration_curve.json" in section and "<td>affine recalibration</td>" in section
    assert section.count("<tr>") == len(CURVE_ROWS) + 1
    assert section.count("data:image/png;base64,") == 1
    # a file that is no curve: one line, exit 2, no page
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": 1}')
    args = [
        "report",
        "--checkpoint",
        str(reported["root"] / "ckpt"),
        "--results-dir",
        str(reported["results"]),
        "--recalibration-curve",
        str(bad),
        "--output-file",
        str(tmp_path / "x.html"),
    ]
    code, text = _invoke(args)
    assert code == 2 and len(text.strip().splitlines()) == 1 and "bad.json" in text
    assert not (tmp_path / "x.html").exists()


def test_report_long_answers_and_held_out(reported: dict[str, Any], tmp_path: Path) -> None:
    """The long-answer section of a sweep of answers longer than any trained; held out, no
    warning about training samples. (Rendered without figures: they are tested above.)"""
    from reports.evaluation import evaluate_checkpoint
    from reports.html import render_html

    long = tmp_path / "long"
    write_results_dir(
        long,
        make_samples(
            n_per_config=1,
            seed=13,
            datasets=("doc_qa",),
            top_ks=(8,),
            blocks=(12,),
            min_output_tokens=65,
            max_output_tokens=80,
        ),
    )
    run = evaluate_checkpoint(reported["root"] / "ckpt", long, held_out_only=True)
    page = render_html(run.evaluation, {})
    section = _section(page, "long-answers")
    assert 'id="long-answers-table"' in section and "growth error %" in section
    assert _embedded(page)["long_answers"]["n_samples"] == 3
    assert [w["kind"] for w in run.evaluation["warnings"]] == ["long_answers"]
    # within the trained lengths the section says so
    short = render_html(reported["evaluation"], {})
    assert "No scored answer is longer than the longest" in _section(short, "long-answers")


# -- in a real browser ---------------------------------------------------------------------------


def _browser_or_skip() -> Any:
    """Playwright's entry point; skips (fails under CI, LATKIT_REQUIRE_BROWSER=1) without
    a browser, saying how to install one."""
    how = (
        "install the browser: apt-get install -y chromium (Debian/Ubuntu; or set "
        "LATKIT_CHROMIUM to a Chromium binary) and pip install -e '.[dev]' (playwright)"
    )
    missing = pytest.fail if os.environ.get("LATKIT_REQUIRE_BROWSER") == "1" else pytest.skip
    if not Path(CHROMIUM).is_file():
        missing(f"no Chromium at {CHROMIUM}: {how}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing(f"playwright is not installed: {how}")
    return sync_playwright


def test_report_in_headless_chromium(reported: dict[str, Any]) -> None:
    sync_playwright = _browser_or_skip()
    evaluation = reported["evaluation"]
    errors: list[str] = []
    failed: list[str] = []
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(reported["page"].resolve().as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])"
            )
            rows = page.locator("#per-config tbody tr").count()
            cell = page.locator("#headline-prefill tbody tr").first.locator("td").nth(3)
            shown, full = cell.inner_text(), cell.get_attribute("data-value")
            # sorting: click "prefill MAPE %" of the per-configuration table twice
            header = page.locator("#per-config th", has_text="prefill MAPE %")
            column = page.eval_on_selector_all(
                "#per-config th", "ths => ths.map(t => t.textContent)"
            ).index("prefill MAPE %")
            values = f"#per-config tbody tr td:nth-child({column + 1})"
            header.click()
            ascending = page.eval_on_selector_all(values, "tds => tds.map(t => +t.dataset.value)")
            header.click()
            descending = page.eval_on_selector_all(values, "tds => tds.map(t => +t.dataset.value)")
        finally:
            browser.close()
    assert errors == [] and failed == []
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    assert len(images) == len(FIGURE_NAMES) + 1  # and the recalibration curve
    assert all(complete and width > 0 and height > 0 for complete, width, height in images)
    assert rows == len(evaluation["per_config"])
    assert float(full) == evaluation["prefill"]["mape_pct"]
    assert shown == f"{evaluation['prefill']['mape_pct']:.2f}"
    assert ascending == sorted(ascending) and descending == sorted(ascending, reverse=True)
