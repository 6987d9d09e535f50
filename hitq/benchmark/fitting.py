"""Token-exact fitting of a table into a prompt budget.

`fit` keeps the task text, the question and the answer-format line intact and shrinks only the
table, in this order of preference:

1. Drop whole rows from the middle at the format's own row boundaries (html `<tr>` elements,
   markdown/csv/latex lines or records, json list elements), keeping the header rows, a head
   and a tail, and put one marker row in the format's own syntax where rows were dropped.
2. Tables made of a few very long rows (csv/markdown padded to thousands of empty columns, a
   two-line csv) lose nearly everything to row dropping, so when one row alone would take more
   than 1/8 of the table's budget, or the median row is over 8k characters, every row is first
   cut to a common length (a character cut with a marker inside the row; the data of padded
   rows is at their start); rows are dropped as well if that is not enough.
3. If even the header rows do not fit, a plain character cut of the table text.

The number of rows kept is the largest that fits, found by a search that guesses from the
measured tokens-per-character ratio and then brackets: typically 2-4 calls of `count` after the
first one, each a full prompt count (the caller's exact counter, chat template and image tokens
included). Row length and character cuts stop within 1/64 of the largest that fits. Tables far
over the budget are not counted whole (see SAMPLE_CHARS_PER_TOKEN).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hitq.errors import TooLong

Messages = list[dict]
HEADER_ROWS = 3  # rows always kept when the format does not mark its header (RealHiTBench headers are multi-row)
LONG_ROW_SHARE = 8  # a row longer than budget/8 triggers cutting inside rows ...
LONG_ROW_MEDIAN = 8192  # ... and so does a median row of this many characters (padded csv/markdown)
MIN_ROW_CHARS = 64  # shortest cut row before rows are also dropped
INTERPOLATION_STEPS = 4  # guesses from the token ratio before plain bisection
# A table longer than SAMPLE_CHARS_PER_TOKEN * budget characters is first measured on its first
# PROBE_CHARS_PER_TOKEN * budget characters: if that prefix alone is over the budget, the whole
# table cannot fit and its (multi-second) full count is replaced by an extrapolation.
SAMPLE_CHARS_PER_TOKEN = 8
PROBE_CHARS_PER_TOKEN = 4


@dataclass
class Fitted:
    messages: Messages
    table: str | None  # the table text that went into the messages
    original_tokens: int  # the prompt with the whole table (extrapolated when original_exact is False)
    input_tokens: int  # the prompt as sent
    rows_dropped: int = 0
    truncated: bool = False
    cut_inside_row: bool = False
    count_calls: int = 1
    original_exact: bool = True
    token_count: Any = None  # the engine's TokenCount of `messages` (set by preflight.prepare_query)


@dataclass
class Split:
    """A table as prefix + sep.join(rows) + suffix; `n_header` leading rows are always kept."""

    prefix: str
    rows: list[str]
    suffix: str
    n_header: int
    marker: Callable[[int], str]  # a row saying that N rows were omitted
    sep: str = ""

    def compose(self, rows: list[str]) -> str:
        return self.prefix + self.sep.join(rows) + self.suffix


# ---------------------------------------------------------------- splitting per format

_TR = re.compile(r"[ \t]*<tr\b.*?</tr>[ \t]*\n?", re.S | re.I)
_THEAD = re.compile(r"<thead\b.*?</thead>", re.S | re.I)


def _split_html(text: str) -> Split | None:
    spans = [m.span() for m in _TR.finditer(text)]
    if not spans:
        return None
    starts = [s for s, _ in spans]
    rows = [text[starts[i]:starts[i + 1]] for i in range(len(spans) - 1)] + [text[spans[-1][0]:spans[-1][1]]]
    heads = [m.span() for m in _THEAD.finditer(text)]
    n_head = sum(1 for s in starts if any(a <= s < b for a, b in heads))
    indent = re.match(r"[ \t]*", rows[-1]).group(0)
    return Split(text[:starts[0]], rows, text[spans[-1][1]:], n_head or HEADER_ROWS,
                 lambda n: f"{indent}<tr><td>... [{n} rows omitted] ...</td></tr>\n")


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def _split_markdown(text: str) -> Split | None:
    lines = _lines(text)
    idx = [i for i, line in enumerate(lines) if line.lstrip().startswith("|")]
    if not idx:
        return None
    a, b = idx[0], idx[-1] + 1
    return Split("".join(lines[:a]), lines[a:b], "".join(lines[b:]), HEADER_ROWS,
                 lambda n: f"| ... [{n} rows omitted] ... |\n")


def _split_csv(text: str) -> Split | None:
    """Records, not lines: a quoted field may contain newlines (the quote count stays odd)."""
    records: list[str] = []
    pending = ""
    for line in _lines(text):
        pending += line
        if pending.count('"') % 2 == 0:
            records.append(pending)
            pending = ""
    if pending:
        records.append(pending)
    if not records:
        return None
    return Split("", records, "", HEADER_ROWS, lambda n: f"... [{n} rows omitted] ...\n")


def _split_latex(text: str) -> Split | None:
    """Rows end with `\\\\`; rules and other lines attach to the row that follows them."""
    lines = _lines(text)
    begin = next((i for i, line in enumerate(lines) if "\\begin{tabular" in line), None)
    end = next((i for i in range(len(lines) - 1, -1, -1) if "\\end{tabular}" in lines[i]), None)
    if begin is None or end is None or end <= begin + 1:
        return None
    rows: list[str] = []
    pending = ""
    for line in lines[begin + 1:end]:
        pending += line
        if line.rstrip().endswith("\\\\"):
            rows.append(pending)
            pending = ""
    if not rows:
        return None
    suffix = pending + "".join(lines[end:])
    n_head = HEADER_ROWS
    for i, row in enumerate(rows[:10]):
        if "\\midrule" in row or "\\endhead" in row:
            n_head = i + 1
    return Split("".join(lines[:begin + 1]), rows, suffix, n_head,
                 lambda n: f"... [{n} rows omitted] ... \\\\\n")


def _split_json(text: str) -> Split | None:
    """The dataset's json tables are a list of row objects written with indent=2; rows are the
    list elements, and the marker is an object, so the result stays valid JSON."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, list) or not data:
        return None
    rows = ["  " + json.dumps(r, indent=2, ensure_ascii=False).replace("\n", "\n  ") for r in data]
    split = Split("[\n", rows, "\n]", HEADER_ROWS,
                  lambda n: "  " + json.dumps({"...": f"[{n} rows omitted]"}), sep=",\n")
    return split if split.compose(rows) == text else None


def _split_lines(text: str) -> Split:
    return Split("", _lines(text), "", HEADER_ROWS, lambda n: f"... [{n} rows omitted] ...\n")


SPLITTERS = {"html": _split_html, "markdown": _split_markdown, "csv": _split_csv,
             "latex": _split_latex, "json": _split_json}


def split_table(text: str, fmt: str) -> Split:
    """Rows at the format's boundaries; falls back to lines when the text does not parse."""
    split = SPLITTERS.get(fmt, lambda _t: None)(text)
    return split if split is not None else _split_lines(text)


# ---------------------------------------------------------------- shrinking

def _drop_rows(split: Split, rows: list[str], keep: int) -> tuple[list[str], int]:
    """Header rows, then `keep` body rows (head half, marker, tail half); returns rows, dropped."""
    head, body = rows[:split.n_header], rows[split.n_header:]
    dropped = len(body) - keep
    if dropped <= 0:
        return rows, 0
    a, b = (keep + 1) // 2, keep // 2
    return head + body[:a] + [split.marker(dropped)] + body[len(body) - b:], dropped


def _cut_row(row: str, limit: int, fmt: str) -> str:
    body = row.rstrip("\n")
    if len(body) <= limit:
        return row
    kept = body[:limit]
    if fmt == "csv" and kept.count('"') % 2:
        kept += '"'  # close the quoted field the cut opened
    return f"{kept} ... [{len(body) - limit} characters omitted] ...{row[len(body):]}"


class _Search:
    """Largest x in [0, hi) whose prompt fits, where prompt size grows with x and `hi` is known
    not to fit. Guesses from the tokens-per-character ratio, then bisects."""

    def __init__(self, count: Callable[[Messages], int], render: Callable[[str], Messages],
                 budget: int, base: int, ratio: float):
        self.count, self.render, self.budget, self.base, self.ratio = count, render, budget, base, ratio
        self.calls = 0

    def largest(self, hi: int, chars: Callable[[int], int], text: Callable[[int], str], exact: bool = True):
        """`exact=False` stops once the bracket is within 1/64 of `hi` (for lengths, not rows)."""
        lo, best, step = -1, None, 0
        target = max(self.budget - self.base, 0)
        while hi - lo > (1 if exact or best is None else max(1, hi // 64)):
            if step < INTERPOLATION_STEPS and self.ratio > 0:
                want = target / self.ratio
                guess = _last_at_most(lo + 1, hi - 1, chars, want)
            else:
                guess = (lo + hi) // 2
            guess = min(max(guess, lo + 1), hi - 1)
            step += 1
            candidate = text(guess)
            messages = self.render(candidate)
            tokens = self.count(messages)
            self.calls += 1
            size = chars(guess)
            if size > 0 and tokens > self.base:
                self.ratio = (tokens - self.base) / size
            if tokens <= self.budget:
                lo, best = guess, (guess, candidate, messages, tokens)
            else:
                hi = guess
        return best


def _last_at_most(lo: int, hi: int, chars: Callable[[int], int], want: float) -> int:
    """Largest x in [lo, hi] with chars(x) <= want (lo if none); chars is nondecreasing."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if chars(mid) <= want:
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit(table: str, fmt: str, render: Callable[[str], Messages], count: Callable[[Messages], int],
        budget: int) -> Fitted:
    """Messages whose prompt has at most `budget` tokens; see the module docstring.
    Raises TooLong when the prompt does not fit even without the table."""
    calls = 0

    def measure(text: str) -> tuple[Messages, int]:
        nonlocal calls
        calls += 1
        messages = render(text)
        return messages, count(messages)

    original, exact = None, True
    if len(table) > SAMPLE_CHARS_PER_TOKEN * budget:
        probe = table[:PROBE_CHARS_PER_TOKEN * budget]
        probe_tokens = measure(probe)[1]
        if probe_tokens > budget:
            base = measure("")[1]
            original, exact = base + round((probe_tokens - base) * len(table) / len(probe)), False
    if original is None:
        messages, original = measure(table)
        if original <= budget:
            return Fitted(messages, table, original, original, count_calls=calls)
        base = measure("")[1]
    if base > budget:
        raise TooLong(f"prompt needs {base} tokens without the table; budget {budget}")
    search = _Search(count, render, budget, base, (original - base) / max(len(table), 1))
    split = split_table(table, fmt)
    n_body = max(len(split.rows) - split.n_header, 0)
    char_budget = (budget - base) / search.ratio
    lengths = sorted(len(r) for r in split.rows)
    long_rows = lengths[-1] > char_budget / LONG_ROW_SHARE or lengths[len(lengths) // 2] > LONG_ROW_MEDIAN

    found = None
    if not long_rows and n_body > 0:
        found = _fit_rows(search, split, split.rows, n_body)
    if found is None:
        found = _fit_cut_rows(search, split, fmt, n_body)
    if found is None:
        found = _fit_chars(search, split.compose(_drop_rows(split, split.rows, 0)[0]), n_body)
    text, msgs, tokens, dropped, cut = found
    return Fitted(msgs, text, original, tokens, dropped, True, cut, search.calls + calls, original_exact=exact)


def _fit_rows(search: _Search, split: Split, rows: list[str], n_body: int):
    """Best number of body rows to keep (rows possibly already cut)."""
    lengths = [len(r) + len(split.sep) for r in rows[split.n_header:]]
    cum = [0]
    for n in lengths:
        cum.append(cum[-1] + n)
    fixed = len(split.prefix) + len(split.suffix) + sum(len(r) for r in rows[:split.n_header]) + 40

    def chars(k: int) -> int:
        return fixed + cum[(k + 1) // 2] + cum[-1] - cum[len(lengths) - k // 2]

    def text(k: int) -> str:
        return split.compose(_drop_rows(split, rows, k)[0])

    best = search.largest(n_body, chars, text)
    if best is None:
        return None
    k, candidate, messages, tokens = best
    return candidate, messages, tokens, n_body - k, False


def _fit_cut_rows(search: _Search, split: Split, fmt: str, n_body: int):
    """Cut every row to the longest common length that fits; drop rows too if needed."""
    longest = max(len(r) for r in split.rows)
    if longest <= MIN_ROW_CHARS:
        return None
    lens = [len(r) for r in split.rows]
    fixed = len(split.prefix) + len(split.suffix)

    def chars(limit: int) -> int:
        return fixed + sum(min(n, limit + 40) for n in lens)

    def text(i: int) -> str:
        return split.compose([_cut_row(r, MIN_ROW_CHARS + i, fmt) for r in split.rows])

    best = search.largest(longest - MIN_ROW_CHARS, lambda i: chars(MIN_ROW_CHARS + i), text, exact=False)
    if best is not None:
        _i, candidate, messages, tokens = best
        return candidate, messages, tokens, 0, True
    if n_body <= 0:
        return None
    cut = [_cut_row(r, MIN_ROW_CHARS, fmt) for r in split.rows]
    found = _fit_rows(search, split, cut, n_body)
    if found is None:
        return None
    candidate, messages, tokens, dropped, _ = found
    return candidate, messages, tokens, dropped, True


def _fit_chars(search: _Search, text: str, dropped: int):
    """Last resort: the first characters of the header-only table and a marker."""
    def cut(x: int) -> str:
        return f"{text[:x]}\n... [{len(text) - x} characters omitted] ...\n"

    best = search.largest(len(text), lambda x: x + 40, cut, exact=False)
    if best is None:  # only the marker itself: base fits, so this is a few tokens over at most
        candidate = cut(0)
        messages = search.render(candidate)
        tokens = search.count(messages)
        search.calls += 1
        if tokens > search.budget:
            raise TooLong(f"prompt needs {tokens} tokens with an empty table; budget {search.budget}")
        return candidate, messages, tokens, dropped, True
    _x, candidate, messages, tokens = best
    return candidate, messages, tokens, dropped, True
