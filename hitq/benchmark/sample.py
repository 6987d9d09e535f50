"""A tiny dataset in the RealHiTBench layout, generated: three hierarchical tables in all five
formats (plus a `_swap` copy for Structure Comprehending), rendered PNGs, and a QA file with every
question type. `hitq demo` and the end-to-end tests run on it; nothing here is downloaded."""
from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

from hitq.benchmark.query import EXTENSIONS

TABLES = {
    "demo-table01": ("Employment by region (thousands)", ["North", "South", "East", "West"], range(2015, 2023)),
    "demo-table02": ("Hospital beds per 1,000 people", ["Urban", "Rural"], range(2010, 2022)),
    "demo-table03": ("Exports by sector (million USD)", ["Agriculture", "Industry", "Services"], range(2018, 2024)),
}


def _grid(file_name: str, swap: bool = False) -> list[list[str]]:
    """Two header rows (a merged group header, then the columns), then one row per year."""
    title, columns, years = TABLES[file_name]
    rng = random.Random(file_name)
    body = [[str(y)] + [str(rng.randint(100, 999)) for _ in columns] + [""] for y in years]
    for row in body:
        row[-1] = str(sum(int(v) for v in row[1:-1]))
    if swap:  # a structural perturbation: body blocks reordered, as the dataset's _swap files are
        half = len(body) // 2
        body = body[half:] + body[:half]
    return [[title] + [""] * (len(columns) + 1), ["Year"] + ["Region"] * len(columns) + ["Total"], [""] + columns + [""]] + body


def _html(grid) -> str:
    rows = "\n".join("    <tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in grid)
    return f"<html>\n<body>\n  <table>\n{rows}\n  </table>\n</body>\n</html>\n"


def _markdown(grid) -> str:
    head, *rest = grid
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rest]
    return "\n".join(lines) + "\n"


def _latex(grid) -> str:
    body = "\n".join(" & ".join(r) + " \\\\" for r in grid)
    return "\\begin{table}[]\n\\begin{tabular}{" + "l" * len(grid[0]) + "}\n" + body + "\n\\end{tabular}\n\\end{table}\n"


def _csv(grid) -> str:
    out = io.StringIO()
    csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(grid)
    return out.getvalue()


def _json(grid) -> str:
    head = [grid[0][0]] + [f"Unnamed: {i}" for i in range(1, len(grid[0]))]
    return json.dumps([{h: (v or None) for h, v in zip(head, row)} for row in grid[1:]], indent=2, ensure_ascii=False)


WRITERS = {"html": _html, "markdown": _markdown, "latex": _latex, "csv": _csv, "json": _json}


def _questions() -> list[dict]:
    q = []

    def add(file_name, qtype, sub, question, answer, processed=None):
        q.append({"id": len(q) + 1, "FileName": file_name, "CompStrucCata": "ColumnHeaderMerge", "Source": "hitq demo",
                  "Question": question, "QuestionType": qtype, "SubQType": sub, "COT": [{"planning": "Read the table."}],
                  "FinalAnswer": answer, "ProcessedAnswer": processed if processed is not None else answer})

    for name in TABLES:
        grid = _grid(name)
        first, last = grid[3], grid[-1]
        add(name, "Fact Checking", "Value-Matching", f"What is the {grid[2][1]} value in {first[0]}?", first[1])
        add(name, "Numerical Reasoning", "Calculation", f"What is the Total in {last[0]}?", last[-1])
        add(name, "Data Analysis", "Rudimentary Analysis", f"What is the highest Total across all years?", max(r[-1] for r in grid[3:]))
        add(name, "Data Analysis", "Summary Analysis", "Summarize the main trend of the table.", "The totals vary across years.")
        values = [int(r[1]) for r in grid[3:]]
        add(name, "Visualization", "BarChart Generation", f"Draw a bar chart of {grid[2][1]} by year.",
            "import pandas as pd\nimport matplotlib.pyplot as plt\nplt.bar([1], [1])\nplt.show()", str(values))
    for sc in [q[0], q[5]]:  # Structure Comprehending: the twin's question, answered on the _swap table
        add(sc["FileName"], "Structure Comprehending", "Structure Comprehending", sc["Question"], "")
    return q


def write_sample(data_dir: str | Path, images: bool = True) -> Path:
    """Write the sample dataset into `data_dir` and return it."""
    data = Path(data_dir)
    for fmt, writer in WRITERS.items():
        (data / fmt).mkdir(parents=True, exist_ok=True)
        for name in TABLES:
            for swap in (False, True):
                stem = name + ("_swap" if swap else "")
                (data / fmt / f"{stem}.{EXTENSIONS[fmt]}").write_text(writer(_grid(name, swap)), encoding="utf-8")
    if images:
        from hitq.benchmark.render import render_table_png

        (data / "image").mkdir(exist_ok=True)
        for name in TABLES:
            for swap in (False, True):
                stem = name + ("_swap" if swap else "")
                render_table_png(_csv(_grid(name, swap)), "csv", data / "image" / f"{stem}.png")
    (data / "QA_final.json").write_text(json.dumps({"queries": _questions()}, indent=4, ensure_ascii=False), encoding="utf-8")
    return data
