"""EM, F1, ROUGE-L and SacreBLEU for one (reference, prediction) pair.

Two scorers live here:

* :func:`official_scores` reproduces RealHiTBench's ``QAMetric.compute([ref], [pred])`` to the last
  digit (docs/realhitbench.md g.1.3): one-decimal rounding of ``\\b\\d+\\.\\d+\\b`` matches, SQuAD
  normalisation, blank prediction -> ``#``, rouge_score rougeL without stemming, sentence
  ``sacrebleu.corpus_bleu`` with its defaults, and every value rounded to 2 decimals per row.
* :func:`corrected_scores` fixes defects 1-8 of that scorer (see docs/evaluation.md): numbers are
  compared as numbers, normalisation is Unicode-aware, an answer made only of articles survives, an
  empty reference is not scorable, BLEU uses effective order, list answers are compared as multisets
  (except for ranking questions), and nothing is rounded per row.

Both return percentages (0-100). rouge_score and sacrebleu are imported lazily.
"""
from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from decimal import Decimal, InvalidOperation
from functools import lru_cache

METRICS = ("EM", "F1", "ROUGE-L", "SacreBLEU")

_DECIMAL = re.compile(r"\b\d+\.\d+\b")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)


# --------------------------------------------------------------------------- official


def process_decimal(text: str) -> str:
    """Official step 1: round every ``d+.d+`` to one decimal with Python's binary ``round``."""
    return _DECIMAL.sub(lambda m: str(round(float(m.group()), 1)), text)


def normalize_answer(text: str) -> str:
    """Official SQuAD normalisation: lower -> drop ASCII punctuation -> articles -> whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _bag_f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    # The vendored `evaluate` rouge builds all four default types; only rougeL is reported and the
    # types are scored independently, so building only rougeL gives identical numbers.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def _rouge_l(reference: str, prediction: str) -> float:
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def _sacrebleu(reference: str, prediction: str, effective_order: bool) -> float:
    if effective_order:
        return _sentence_bleu().sentence_score(prediction, [reference]).score
    import sacrebleu

    return sacrebleu.corpus_bleu([prediction], [[reference]]).score


@lru_cache(maxsize=1)
def _sentence_bleu():
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=True)


def official_scores(reference: str, prediction: str) -> dict[str, float]:
    """Scores exactly as the official ``QAMetric.compute([reference], [prediction])``."""
    ref = normalize_answer(process_decimal(reference or ""))
    pred = normalize_answer(process_decimal(prediction or "")) or "#"
    return {
        "EM": round(float(pred == ref) * 100, 2),
        "F1": round(_bag_f1(pred.split(), ref.split()) * 100, 2),
        "ROUGE-L": round(_rouge_l(ref, pred) * 100, 2),
        "SacreBLEU": round(_sacrebleu(ref, pred, effective_order=False), 2),
    }


# --------------------------------------------------------------------------- corrected

# A number: optional sign, digits with optional thousands separators, optional decimals, optional %.
_NUMBER = re.compile(r"(?<![\w.])([-+\u2212]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(%?)(?![\w])")
_LIST_SEPARATORS = re.compile(r"\s*[,;\n]\s*")


def _canonical_number(sign: str, whole: str, frac: str | None, percent: str) -> str:
    """`1,000.50` -> `1000.5`, `-3.50%` -> `-3.5%`, `4.00` -> `4`: one spelling per value."""
    try:
        value = Decimal(whole.replace(",", "") + (frac or ""))
    except InvalidOperation:  # pragma: no cover - the regex only admits digits
        return whole
    if sign in ("-", "\u2212"):
        value = -value
    text = format(value.normalize(), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text in ("-0", "+0"):
        text = "0"
    return f"NUM{text}{'%' if percent else ''}".replace(".", "d").replace("-", "m").replace("%", "p")


def corrected_normalize(text: str) -> str:
    """Unicode-aware normalisation that keeps numbers intact.

    NFKC, casefold, numbers rewritten to a canonical token (so `3.5` != `35`, `4` == `4.00`,
    `1,000.55` == `1000.55`), then every Unicode punctuation/symbol character becomes a space, and
    articles are removed unless the answer consists only of articles (reference `A` stays `a`).
    """
    text = unicodedata.normalize("NFKC", text or "").casefold()
    text = _NUMBER.sub(lambda m: f" {_canonical_number(*m.groups())} ", text)
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    tokens = text.split()
    kept = [t for t in tokens if t not in ("a", "an", "the")]
    return " ".join(kept or tokens)


def _items(text: str) -> list[str]:
    """Split a list answer on `,`/`;`/newlines (thousands separators are protected)."""
    protected = re.sub(r"(\d),(\d{3})", r"\1\2", text or "")
    return [corrected_normalize(part) for part in _LIST_SEPARATORS.split(protected) if part.strip()]


def _unicode_tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def corrected_scores(reference: str, prediction: str, ordered: bool = False) -> dict[str, float] | None:
    """Corrected scores in percent, unrounded; None when the reference is empty (not scorable).

    ``ordered`` keeps list order significant (ranking questions); otherwise comma-separated list
    answers are compared as multisets for EM and ROUGE-L.
    """
    ref = corrected_normalize(reference)
    if not ref:
        return None
    pred = corrected_normalize(prediction)
    ref_items, pred_items = _items(reference), _items(prediction)
    if not ordered and len(ref_items) > 1:
        exact = Counter(ref_items) == Counter(pred_items)
        ref, pred = " ".join(sorted(ref_items)), " ".join(sorted(pred_items))
    else:
        exact = pred == ref
    ref_tokens, pred_tokens = _unicode_tokens(ref), _unicode_tokens(pred)
    lcs = _lcs(pred_tokens, ref_tokens)
    rouge = 0.0 if lcs == 0 else 2 * lcs / (len(pred_tokens) + len(ref_tokens))
    return {
        "EM": 100.0 * exact,
        "F1": 100.0 * _bag_f1(pred.split(), ref.split()) if pred else 0.0,
        "ROUGE-L": 100.0 * rouge,
        "SacreBLEU": min(100.0, _sacrebleu(ref, pred, effective_order=True)) if pred else 0.0,
    }
