import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark_fixtures import count_text_tokens, rhb_data  # noqa: E402,F401

from hitq.benchmark import fitting, tables  # noqa: E402
from hitq.errors import TooLong  # noqa: E402

TASK = "Instructions. " * 20
TAIL = "\n# Question\nWhat is it?\nEmphasize: [Final Answer]: AnswerName1\n"


def render(table: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": TASK + "\n# Table\n" + table + TAIL}]}]


class Counter:
    """len(text)//4, counting calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, messages):
        self.calls += 1
        return len(messages[0]["content"][0]["text"]) // 4


def text_of(f: fitting.Fitted) -> str:
    return f.messages[0]["content"][0]["text"]


@pytest.mark.parametrize("fmt, marker", [
    ("html", "<tr><td>... [{n} rows omitted] ...</td></tr>"),
    ("markdown", "| ... [{n} rows omitted] ... |"),
    ("latex", "... [{n} rows omitted] ... \\\\"),
    ("csv", "... [{n} rows omitted] ..."),
    ("json", '{{"...": "[{n} rows omitted]"}}'),
])
def test_row_dropping_per_format(rhb_data, fmt, marker):
    table = tables.read_table(rhb_data, fmt, "employment-table01")
    split = fitting.split_table(table, fmt)
    assert split.compose(split.rows) == table and len(split.rows) > 70
    count = Counter()
    budget = len(table) // 6  # not far over (< SAMPLE_CHARS_PER_TOKEN): the whole table is counted
    f = fitting.fit(table, fmt, render, count, budget)
    assert f.truncated and not f.cut_inside_row and f.input_tokens <= budget
    assert f.original_tokens == len(render(table)[0]["content"][0]["text"]) // 4 and f.original_exact
    assert count.calls == f.count_calls <= 6
    out = text_of(f)
    assert out.startswith(TASK) and out.endswith(TAIL)  # instructions and question kept
    assert marker.format(n=f.rows_dropped) in f.table
    body = split.rows[split.n_header:]
    assert f.table.startswith(split.prefix + "".join(split.rows[:split.n_header]) if fmt != "json" else "[\n")
    assert body[0] in f.table and body[-1] in f.table  # a head and a tail are kept
    # the largest table that fits: one more row does not
    kept = len(body) - f.rows_dropped
    bigger = split.compose(fitting._drop_rows(split, split.rows, kept + 1)[0])
    assert count(render(bigger)) > budget
    if fmt == "json":
        rows = json.loads(f.table)
        assert len(rows) == len(split.rows) - f.rows_dropped + 1


def test_csv_quoted_newlines_are_one_record(rhb_data):
    table = tables.read_table(rhb_data, "csv", "employment-table01")
    split = fitting.split_table(table, "csv")
    assert split.rows[0].startswith('"HOUSEHOLD DATA\nANNUAL AVERAGES\n')  # a record spanning 3 lines
    assert all(r.count('"') % 2 == 0 for r in split.rows)


def test_html_thead_rows_are_header(rhb_data):
    html = ("<table><thead>\n<tr><th>a</th></tr>\n<tr><th>b</th></tr>\n</thead><tbody>\n"
            + "".join(f"<tr><td>{i}</td></tr>\n" for i in range(100)) + "</tbody></table>\n")
    split = fitting.split_table(html, "html")
    assert split.n_header == 2 and len(split.rows) == 102 and split.compose(split.rows) == html
    f = fitting.fit(html, "html", render, Counter(), (len(TASK) + len(TAIL) + 600) // 4)
    assert f.table.startswith("<table><thead>\n<tr><th>a</th></tr>\n<tr><th>b</th></tr>\n</thead><tbody>\n<tr><td>0<")
    assert f.table.endswith("<tr><td>99</td></tr>\n</tbody></table>\n")


def test_two_line_csv_with_huge_rows_is_cut_inside_rows():
    header = ",".join(f"col{i}" for i in range(20_000)) + "\n"
    row = ",".join(f'"v{i}"' for i in range(20_000)) + "\n"
    table = header + row
    count = Counter()
    f = fitting.fit(table, "csv", render, count, 5_000)
    assert f.truncated and f.cut_inside_row and f.rows_dropped == 0 and f.input_tokens <= 5_000
    assert f.input_tokens > 4_500  # close to the budget, not a tiny remnant
    lines = f.table.splitlines()
    assert len(lines) == 2 and lines[0].startswith("col0,col1,") and lines[1].startswith('"v0","v1",')
    assert "characters omitted] ..." in lines[0] and "characters omitted] ..." in lines[1]
    assert count.calls <= 12
    assert text_of(f).endswith(TAIL)


def test_huge_header_falls_back_to_character_cut():
    table = "x" * 100_000 + "\n" + "".join(f"{i}\n" for i in range(10))
    f = fitting.fit(table, "html", render, Counter(), 2_000)  # no <tr>: line rows; one giant line
    assert f.truncated and f.cut_inside_row and f.input_tokens <= 2_000


def test_fits_untouched_and_too_long(rhb_data):
    table = tables.read_table(rhb_data, "csv", "employment-table01")
    count = Counter()
    f = fitting.fit(table, "csv", render, count, 10**6)
    assert (f.table, f.truncated, f.rows_dropped, f.count_calls, count.calls) == (table, False, 0, 1, 1)
    assert f.input_tokens == f.original_tokens
    with pytest.raises(TooLong, match=r"prompt needs \d+ tokens without the table; budget 50"):
        fitting.fit(table, "csv", render, Counter(), 50)


def test_far_too_long_table_is_not_counted_whole():
    table = "".join(f"<tr><td>{i}</td><td>{'z' * 50}</td></tr>\n" for i in range(40_000))
    count = Counter()
    f = fitting.fit(table, "html", render, count, 10_000)
    assert not f.original_exact and abs(f.original_tokens - len(render(table)[0]["content"][0]["text"]) // 4) < 2_000
    assert f.input_tokens <= 10_000 and count.calls <= 7


@pytest.mark.slow
def test_real_tokenizer_on_real_table(rhb_data):
    table = tables.read_table(rhb_data, "html", "employment-table01")
    calls = []

    def count(messages):
        calls.append(1)
        return count_text_tokens(messages)

    f = fitting.fit(table, "html", render, count, 6_000)
    assert f.truncated and f.input_tokens <= 6_000 and count_text_tokens(f.messages) == f.input_tokens
    split = fitting.split_table(table, "html")
    kept = len(split.rows) - split.n_header - f.rows_dropped
    assert count_text_tokens(render(split.compose(fitting._drop_rows(split, split.rows, kept + 1)[0]))) > 6_000
    assert len(calls) <= 6
