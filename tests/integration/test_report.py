"""`hitq report` for two runs writes four PNGs with content and one HTML that embeds all of them."""
import base64
import io
import json
import re
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from hitq.cli.evaluate import report

SHARED = Path("/work/shared/reference-runs")


def _export(tmp_path):
    """A hitq-style export with tokens, budget and error kinds, derived from the reference run."""
    rows = json.loads((SHARED / "qwen3-vl-8b-text_html/results.json").read_text())["results"][:400]
    for i, row in enumerate(rows):
        row.pop("Metrics")
        row["input_tokens"] = 1000 + 37 * i
        row["processing_time"] = 0.5 + (i % 7)
        row["status"] = "error" if i % 50 == 0 else "done"
        row["error_kind"] = "too_long" if i % 50 == 0 else None
    path = tmp_path / "export.json"
    path.write_text(json.dumps({"run": {"name": "mix_html", "config": {"max_input_tokens": 12000}}, "rows": rows}))
    return path


def test_report_for_two_runs(tmp_path):
    out = tmp_path / "report"
    args = ["--predictions", str(SHARED / "legacy-checkpoint-mix_markdown/checkpoint.json"),
            "--predictions", str(_export(tmp_path)), "--out", str(out)]
    result = CliRunner().invoke(report, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("*.png"))
    assert [p.stem for p in pngs] == ["errors", "per_type", "time", "tokens"]
    html = (out / "report.html").read_text()
    for png in pngs:
        with Image.open(png) as img:
            assert img.format == "PNG" and img.width >= 500 and img.height >= 300
            colours = img.convert("RGB").getcolors(maxcolors=1_000_000)
            assert len(colours) > 20  # something was drawn, not a blank canvas
        tag = re.search(rf"<img id='plot-{png.stem}'[^>]*src='data:image/png;base64,([^']+)'", html)
        assert tag, png.stem
        assert base64.b64decode(tag.group(1)) == png.read_bytes()
    assert "Run mix_html" in html and "Run legacy-checkpoint-mix_markdown" in html
    assert "unscored (" in html  # Summary/Anomaly without a judge, charts without tables
    with Image.open(io.BytesIO((out / "tokens.png").read_bytes())) as img:
        assert img.size[0] > 0


def test_report_needs_a_source(tmp_path):
    result = CliRunner().invoke(report, ["--out", str(tmp_path)])
    assert result.exit_code != 0
