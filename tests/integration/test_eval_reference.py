"""`hitq eval --compat official` reproduces the reference values of docs/realhitbench.md g.3."""
import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from hitq.cli.evaluate import eval_command

SHARED = Path("/work/shared")
RESULTS = SHARED / "reference-runs/qwen3-vl-8b-text_html/results.json"
CHECKPOINT = SHARED / "reference-runs/legacy-checkpoint-mix_markdown/checkpoint.json"

# (type, subtype or None, n, EM, F1, ROUGE-L, SacreBLEU) from the reference table
TEXT = [
    ("Fact Checking", None, 1214, 46.13, 55.52, 55.48, 5.40),
    ("Fact Checking", "Value-Matching", 507, 63.51, 68.86, 68.86, 4.55),
    ("Fact Checking", "Inference-based Fact Checking", 454, 34.80, 47.23, 47.20, 5.95),
    ("Fact Checking", "Multi-hop Fact Checking", 247, 31.58, 43.59, 43.48, 6.21),
    ("Fact Checking", "Ranking", 4, 25.00, 31.25, 31.25, 3.99),
    ("Numerical Reasoning", None, 771, 12.19, 28.14, 26.99, 5.09),
    ("Numerical Reasoning", "Calculation", 256, 13.67, 19.28, 19.28, 0.11),
    ("Numerical Reasoning", "Counting", 205, 6.83, 9.47, 9.38, 0.46),
    ("Numerical Reasoning", "Comparison", 127, 7.09, 46.48, 46.48, 7.50),
    ("Numerical Reasoning", "Ranking", 105, 27.62, 67.52, 59.61, 26.39),
    ("Numerical Reasoning", "Multi-hop Numerical Reasoning", 78, 8.97, 23.38, 22.91, 1.01),
    ("Data Analysis", None, 531, 5.46, 38.22, 34.48, 12.36),
    ("Data Analysis", "Summary Analysis", 213, 0.00, 36.22, 26.98, 7.09),
    ("Data Analysis", "Exploratory Analysis", 135, 11.85, 58.74, 58.74, 30.47),
    ("Data Analysis", "Rudimentary Analysis", 90, 11.11, 21.19, 21.36, 4.10),
    ("Data Analysis", "Predictive Analysis", 63, 3.17, 26.14, 26.14, 4.82),
    ("Data Analysis", "Anomaly Analysis", 30, 3.33, 36.50, 35.48, 8.83),
    ("Structure Comprehending", None, 393, 29.01, 41.37, 40.56, 4.94),
]
CHARTS = [
    (None, 154, 27.92, 11.69), ("BarChart Generation", 52, 26.92, 11.54),
    ("LineChart Generation", 57, 28.07, 12.28), ("PieChart Generation", 23, 34.78, 13.04),
    ("ScatterChart Generation", 22, 22.73, 9.09),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("realhitbench")
    subprocess.run([str(SHARED / "realhitbench/unpack"), str(root), "tables", "csv"], check=True)
    return root


def _eval(*args):
    result = CliRunner().invoke(eval_command, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.fixture(scope="module")
def official(data_dir):
    return _eval("--compat", "official", "--predictions", str(RESULTS), "--data", str(data_dir))


def _group(doc, qtype, sub):
    return doc["by_type"][qtype] if sub is None else doc["by_subtype"][qtype][sub]


@pytest.mark.parametrize("qtype, sub, n, em, f1, rouge, bleu", TEXT)
def test_text_metrics_match_reference(official, qtype, sub, n, em, f1, rouge, bleu):
    g = _group(official, qtype, sub)
    assert g["n"] == n
    got = [g["EM"], g["F1"], g["ROUGE-L"], g["SacreBLEU"]]
    assert got == pytest.approx([em, f1, rouge, bleu], abs=0.01)


@pytest.mark.parametrize("sub, n, ecr, pass1", CHARTS)
def test_chart_metrics_match_reference(official, sub, n, ecr, pass1):
    g = _group(official, "Visualization", sub)
    assert g["n"] == n
    assert [g["ECR"], g["Pass@1"]] == pytest.approx([ecr, pass1], abs=0.01)


def test_denominators_overall_and_variants(official):
    sc = official["by_type"]["Structure Comprehending"]
    assert (sc["n"], sc["errors"], sc["scored"]) == (393, 17, 376)
    assert sc["excluding_errors"]["EM"] == pytest.approx(30.32, abs=0.01)
    da = official["by_type"]["Data Analysis"]
    assert da["counts"]["Judge"] == {"n": 243, "scored": 0, "errors": 0, "unscored": 243}
    overall = official["overall"]
    assert overall["Overall"] == pytest.approx(30.01, abs=0.01)
    assert [overall[m] for m in ("EM", "F1", "ROUGE-L", "SacreBLEU")] == pytest.approx([27.40, 43.19, 42.08, 6.53], abs=0.01)
    assert official["mode"] == "official"


def test_corrected_mode_marks_summary_unscored(data_dir):
    doc = _eval("--predictions", str(RESULTS), "--data", str(data_dir))
    da = doc["by_subtype"]["Data Analysis"]
    assert da["Summary Analysis"]["EM"] is None and da["Summary Analysis"]["unscored"] == 213
    assert doc["by_type"]["Data Analysis"]["counts"]["EM"]["scored"] == 288
    viz = doc["by_type"]["Visualization"]
    assert viz["counts"]["ECR"]["unscored"] == 4  # tables that are LFS pointers or missing
    assert 0 < viz["ECR"] < 100


def test_checkpoint_layout_without_data():
    doc = _eval("--compat", "official", "--predictions", str(CHECKPOINT))
    assert doc["overall"]["n"] == 3060 and doc["overall"]["errors"] == 28
    assert doc["by_type"]["Visualization"]["counts"]["ECR"]["unscored"] > 0  # no tables given
