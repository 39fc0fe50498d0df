"""The HTML report: self-contained, and rendered by a real headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from saved_sae import TC_IN, TC_OUT, make_run, saved_transcoder, text_file

from drrik.analysis import AnalysisConfig, analyze
from drrik.cli import main
from drrik.report import select_features, write_report
from drrik.sae import SAEConfig, build_sae

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--window-size=1280,1600",
]


@pytest.fixture(scope="module")
def run(tiny_model, tiny_model_dir, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("report")
    run = make_run(base / "run", tiny_model, tiny_model_dir, text_file(base / "docs.txt"))
    (run / "metrics.jsonl").write_text(
        "\n".join(
            f'{{"step": {s}, "tokens": {512 * s}, "sae": "x", "loss": {10 / s}, "l0": 8}}'
            for s in range(1, 6)
        )
    )
    analyze(run, AnalysisConfig(n_tokens=256, batch_size_prompts=4), model=tiny_model)
    return run


@pytest.fixture(scope="module")
def report(run) -> Path:
    return write_report(run, n_features=5)


def test_report_is_self_contained(report, run):
    page = report.read_text()
    assert report == run / "report" / "index.html"
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", page)  # nothing remote
    assert "<link" not in page
    assert page.count('src="data:image/png;base64,') == 5 + 5  # 5 plots + 5 histograms
    features = re.findall(r'<section class="page feature" id="f(\d+)">', page)
    assert len(features) == 5
    assert 'class="tok max"' in page and "Quantile-band examples" in page
    assert "promoted" in page  # logit effects table
    assert len(list((run / "report" / "plots").glob("*.png"))) == 10


def test_select_features_spreads_over_alive_features(run):
    from drrik.saved import SavedSAE

    results = SavedSAE.locate(run).load_analysis()
    chosen = select_features(results, 6)
    density = results.density[chosen]
    assert len(chosen) == 6 and bool((density > 0).all())
    assert density.tolist() == sorted(density.tolist())
    assert float(density[-1]) == float(results.density.max())


def test_cmd_report_with_features(run, tmp_path, capsys):
    assert main(["report", str(run), "--features", "0", "3", "--out", str(tmp_path)]) == 0
    assert str(tmp_path / "index.html") in capsys.readouterr().out
    page = (tmp_path / "index.html").read_text()
    assert re.findall(r'id="f(\d+)"', page) == ["0", "3"]
    assert plt.get_fignums() == []


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return found


def test_report_renders_in_headless_chromium(report, tmp_path):
    chromium = _chromium()
    feature = re.findall(r'id="f(\d+)"', report.read_text())[2]
    url = f"{report.resolve().as_uri()}#f{feature}"
    flags = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=3000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    ).stdout
    check = re.search(r'data-check="([^"]*)"', dom)
    assert check, "the report's load-time check did not run"
    assert check.group(1) == f"images=10 broken=0 page=f{feature} shown=true"

    screenshot = Path(os.environ.get("DRRIK_SCREENSHOT_DIR", tmp_path)) / "report-feature.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [*flags, f"--screenshot={screenshot}", url],
        capture_output=True,
        timeout=120,
        env=env,
        check=True,
    )
    image = plt.imread(screenshot)
    assert image.shape[:2] == (1600, 1280)
    assert image.std() > 0.05  # tables, highlights and plots, not a blank page


def test_a_transcoder_report_names_both_hooks(tiny_model, tiny_model_dir, tmp_path):
    """A transcoder's features are read at its input hook, and its report says what it is:
    input hook → target hook, and its output width."""
    tc_in, tc_out = TC_IN, TC_OUT
    tc = build_sae(
        SAEConfig(
            architecture="relu", d_in=64, d_sae=16, skip_connection=True, apply_b_dec_to_input=False
        )
    )
    data = text_file(tmp_path / "d.txt", paragraphs=40)
    saved_transcoder(tmp_path / "tc", tiny_model_dir, tc, data)
    cfg = AnalysisConfig(n_tokens=256, batch_size_prompts=4)
    assert analyze(tmp_path / "tc", cfg, model=tiny_model).meta["hook"] == tc_in
    page = write_report(tmp_path / "tc", n_features=1).read_text()
    assert f"<th>transcoder</th><td class='num'>{tc_in} → {tc_out}</td>" in page
    assert "<th>d_out</th>" in page
