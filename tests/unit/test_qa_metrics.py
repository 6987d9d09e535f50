"""Text metrics: the official scorer to the last digit, and the corrected one's fixes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hitq.evaluation.qa_metrics import (
    corrected_normalize,
    corrected_scores,
    normalize_answer,
    official_scores,
    process_decimal,
)

REFERENCE_RUN = Path("/work/shared/reference-runs/qwen3-vl-8b-text_html/results.json")


@pytest.mark.parametrize("text, expected", [
    ("0.25", "0.2"), ("0.35", "0.3"), ("2.05", "2.0"), ("3.45", "3.5"), ("1000.55", "1000.5"),
    ("3.0", "3.0"), ("12", "12"), ("13R22.50", "13R22.50"), ("1,000.55", "1,0.6"),
])
def test_process_decimal_uses_binary_round(text, expected):
    assert process_decimal(text) == expected


def test_normalize_answer_order():
    assert normalize_answer("The  Answer, is: 3.5%!") == "answer is 35"
    assert normalize_answer("A") == ""


@pytest.mark.parametrize("ref, pred, expected", [
    ("yes", "yes", {"EM": 100.0, "F1": 100.0, "ROUGE-L": 100.0, "SacreBLEU": 0.0}),  # defect 6
    ("a b c d e", "a b c d e", {"EM": 100.0, "F1": 100.0, "ROUGE-L": 100.0, "SacreBLEU": 100.0}),
    ("A", "A", {"EM": 0.0, "F1": 0.0, "ROUGE-L": 0.0, "SacreBLEU": 0.0}),  # defect 3
    ("Alice, Bob", "Bob, Alice", {"EM": 0.0, "F1": 100.0, "ROUGE-L": 50.0, "SacreBLEU": 0.0}),  # defect 7
    ("3.5", "35", {"EM": 100.0, "F1": 100.0, "ROUGE-L": 100.0, "SacreBLEU": 0.0}),  # defect 1
    ("x", "", {"EM": 0.0, "F1": 0.0, "ROUGE-L": 0.0, "SacreBLEU": 0.0}),
])
def test_official_examples(ref, pred, expected):
    assert official_scores(ref, pred) == expected


def test_official_matches_every_stored_row_of_the_reference_run():
    rows = json.loads(REFERENCE_RUN.read_text())["results"]
    checked = 0
    for row in rows:
        stored = row["Metrics"]
        if "F1" in stored:
            assert official_scores(row["Reference"], row["Prediction"]) == pytest.approx(stored, abs=1e-9), row["id"]
            checked += 1
    assert checked == 2666


@pytest.mark.parametrize("ref, pred, em", [
    ("3.5", "35", 0.0), ("4", "4.00", 100.0), ("1,000.55", "1000.55", 100.0), ("A", "A", 100.0),
    ("Alice, Bob", "Bob, Alice", 100.0), ("don’t", "don't", 100.0), ("-3.5", "3.5", 0.0),
    ("0.92", "0.91", 0.0), ("96.10%", "96.1%", 100.0),
])
def test_corrected_exact_match(ref, pred, em):
    assert corrected_scores(ref, pred)["EM"] == em


def test_corrected_ranking_keeps_order_and_blank_reference_is_unscored():
    assert corrected_scores("Alice, Bob", "Bob, Alice", ordered=True)["EM"] == 0.0
    assert corrected_scores("", "anything") is None
    assert corrected_scores("yes", "yes")["SacreBLEU"] == pytest.approx(100.0)  # effective order


def test_corrected_rouge_is_unicode_aware():
    assert corrected_scores("東京", "東京")["ROUGE-L"] == 100.0
    assert official_scores("東京", "東京")["ROUGE-L"] == 0.0  # defect 5


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(_text, _text)
def test_scores_are_percentages(ref, pred):
    for scores in (official_scores(ref, pred), corrected_scores(ref, pred) or {}):
        assert all(0.0 <= v <= 100.0 for v in scores.values())


@settings(max_examples=100, deadline=None)
@given(_text)
def test_corrected_identity_is_exact_match(text):
    scores = corrected_scores(text, text)
    assert scores is None or scores["EM"] == 100.0
    assert (scores is None) == (corrected_normalize(text) == "")


def test_cli_module_import_is_light():
    code = ("import sys, hitq.cli.evaluate; bad = [m for m in ('matplotlib', 'pandas', 'rouge_score', 'sacrebleu',"
            " 'torch') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
