"""Visualization scoring: ECR (the code ran) and Pass@1 (the plotted y-values match the reference).

``official`` (``--compat official``) reproduces RealHiTBench's rules including their defects
(docs/realhitbench.md g.1.6): the path rewrite, the ``import pandas as pd ... plt.show()`` extraction,
per-line space stripping, the ``__main__`` wrapper, two executions, readers on ``plt.gca()`` only,
``repr``/``literal_eval`` transfer, flatten + ``round(x, 2)`` + sort + exact equality, pie references
re-normalised. All rows run sequentially in one sandboxed child so that figures leaked by failing
rows affect later rows as they did officially (43/154 ECR on the reference run, not 44).

``corrected`` (default) fixes defects 12-24: whole code block, indentation repaired instead of
stripped, one fresh forked process per row with the table in its cwd as ``table.xlsx``/``table.csv``,
one execution, every axes read (horizontal bars by width), values returned as JSON floats
(masked -> NaN), references parsed with ``nan``/``masked`` allowed, comparison of the sorted values
with a tolerance (abs 0.01 or rel 1 %), pie fractions compared directly. A row whose table is
missing or a Git LFS pointer is not scored (reason ``input_missing``).
"""
from __future__ import annotations

import ast
import math
import re
import shutil
import tempfile
import textwrap
from pathlib import Path

from hitq.evaluation import sandbox

#: seconds per execution stage (official: 15 s SIGALRM per stage).
ROW_TIMEOUT_S = 15.0

_EVAL_CODE = '''
if chart_type == 'LineChart': 
    y_predictions = get_line_y_predictions(plt)
if chart_type == 'BarChart':
    y_predictions = get_bar_y_predictions(plt)
if chart_type == 'ScatterChart':
    y_predictions = get_scatter_y_predictions(plt)
if chart_type == 'PieChart':
    y_predictions = get_pie_y_predictions(plt)

print(y_predictions)
'''


def chart_type_of(subqtype: str) -> str:
    """``"BarChart Generation"`` -> ``"BarChart"`` (the official first-word rule)."""
    return (subqtype or "").split()[0] if (subqtype or "").split() else ""


# --------------------------------------------------------------------------- code extraction


def _surround_with_main(code: str) -> str:
    return "\nif __name__ == '__main__':\n" + "".join(f"    {line}\n" for line in code.strip().split("\n"))


def official_sources(prediction: str, table_path: str, chart_type: str) -> tuple[str, str]:
    """The two programs the official scorer executes for one prediction (stage 1, stage 2)."""
    text = re.sub(r"'[^']*\.xlsx'", lambda _m: f"'{table_path}'", prediction)
    text = text.replace("table.xlsx", table_path)
    matches = re.findall(r"import pandas as pd.*?plt\.show\(\)", text, flags=re.S) or re.findall(
        r"import matplotlib.pyplot as plt.*?plt\.show\(\)", text, flags=re.S)
    extracted = matches[-1] if matches else ""
    python_code = "".join(f"{line.strip(' ')}\n" for line in extracted.strip().split("\n"))
    eval_code = f'    from utils.chart_metric_util import *\n{python_code}\nchart_type="{chart_type}"\n{_EVAL_CODE}'
    return _surround_with_main(python_code), _surround_with_main(eval_code)


_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)
_CODE_START = re.compile(r"^[ \t]*(import|from)\s+\w", re.M)


def _repair_indentation(code: str) -> str:
    """Drop the one-space template artefact (lines indented 1 mod 4), then dedent (defect 12)."""
    lines = []
    for line in code.splitlines():
        n = len(line) - len(line.lstrip(" "))
        lines.append(line[1:] if n % 4 == 1 else line)
    return textwrap.dedent("\n".join(lines)).strip("\n") + "\n"


def corrected_source(prediction: str) -> str | None:
    """The model's code as one runnable module, or None when the answer holds no code."""
    blocks = _FENCE.findall(prediction or "")
    code = blocks[-1] if blocks else prediction or ""
    start = _CODE_START.search(code)
    if start is None:
        return None
    code = code[start.start():]
    code = re.sub(r"""(['"])[^'"\n]*\.xlsx\1""", "'table.xlsx'", code)
    code = re.sub(r"""(['"])[^'"\n]*\.csv\1""", "'table.csv'", code)
    for candidate in (_repair_indentation(code), "".join(f"{ln.strip(' ')}\n" for ln in code.splitlines())):
        try:
            compile(candidate, "<model code>", "exec")
            return candidate
        except (SyntaxError, ValueError):
            continue
    return _repair_indentation(code)  # fails at exec time: ECR False with the syntax error


# --------------------------------------------------------------------------- comparison


def _isnan(x) -> bool:
    if isinstance(x, (int, float)):
        return math.isnan(x)
    raise TypeError(f"ufunc 'isnan' not supported for {type(x).__name__}")


def _flat_rounded(values) -> list:
    flat = []
    for v in values:
        flat.extend(v) if isinstance(v, list) else flat.append(v)
    return [round(v, 2) for v in flat]


def _official_compare(ref: list, pred: list) -> bool:
    ref.sort()
    pred.sort()
    if len(ref) != len(pred):
        return False
    for r, p in zip(ref, pred):
        if _isnan(r):
            if not _isnan(p):
                return False
        elif r != p:
            return False
    return True


def official_pass(output: str, reference: str, chart_type: str):
    """Official Pass value: True/False, or the strings ``'False'`` (unparseable) / ``'None'`` (empty)."""
    if output == "":
        return "None"
    try:
        pred = ast.literal_eval(output)
        ref = ast.literal_eval(reference)
        if chart_type == "PieChart":
            flat = []
            for v in ref:
                flat.extend(v) if isinstance(v, list) else flat.append(v)
            total = 0
            for v in flat:
                total += v
            return _official_compare(_flat_rounded([round(v / total, 2) for v in flat]), _flat_rounded(pred))
        return _official_compare(_flat_rounded(ref), _flat_rounded(pred))
    except Exception:
        return "False"


def parse_reference(text: str) -> list[float]:
    """A ``ProcessedAnswer`` as flat floats; ``nan``/``masked``/``np.float64(x)`` are accepted."""
    text = re.sub(r"np\.(?:float|int)\d*\(([^()]*)\)", r"\1", (text or "").strip())
    text = re.sub(r"\b(nan|masked|None)\b", "None", text)
    value = ast.literal_eval(text)
    return _flatten_floats(value)


def _flatten_floats(value) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flatten_floats(v)]
    return [math.nan if value is None else float(value)]


def corrected_match(values: list[list[float]], reference: str, chart_type: str) -> bool:
    """Sorted multiset comparison with tolerance; NaN matches NaN."""
    ref = sorted(parse_reference(reference), key=lambda v: (math.isnan(v), v))
    pred = sorted(_flatten_floats(values), key=lambda v: (math.isnan(v), v))
    if len(ref) != len(pred) or not ref:
        return False
    rel = 0.0 if chart_type == "PieChart" else 0.01
    return all((math.isnan(r) and math.isnan(p)) or math.isclose(r, p, rel_tol=rel, abs_tol=0.01 + 1e-9)
               for r, p in zip(ref, pred))


# --------------------------------------------------------------------------- running


def _is_usable(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return not fh.read(64).startswith(b"version https://git-lfs")


def _csv_for(data_dir: Path, file_name: str, xlsx: Path, dest: Path) -> None:
    csv = data_dir / "csv" / f"{file_name}.csv"
    if _is_usable(csv):
        shutil.copyfile(csv, dest)
        return
    try:  # dataset without its csv part: derive one so read_csv works too
        import pandas as pd

        pd.read_excel(xlsx, header=None).to_csv(dest, index=False, header=False)
    except Exception:
        pass


def _outcome(ecr, passed, reason, seconds=None, raw=None) -> dict:
    return {"ECR": None if ecr is None else 100.0 * bool(ecr), "Pass@1": None if passed is None else 100.0 * bool(passed),
            "chart_reason": reason, "chart_seconds": seconds, "chart_pass_raw": raw}


def evaluate_charts(rows: list[dict], data_dir: str | Path | None, compat: bool = False,
                    timeout_s: float = ROW_TIMEOUT_S) -> dict[int, dict]:
    """Score Visualization rows; returns ``{id: {"ECR", "Pass@1", "chart_reason", ...}}``.

    Values are per-row percentages (100 or 0) so that type-level numbers are plain means. Without a
    usable ``data_dir/tables`` every row is returned unscored (``no_tables``).
    """
    rows = sorted(rows, key=lambda r: r["id"])  # the official loop ran in id order
    tables = Path(data_dir) / "tables" if data_dir else None
    if tables is None or not tables.is_dir():
        return {r["id"]: _outcome(None, None, "no_tables") for r in rows}
    out: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="hitq-charts-") as tmp:
        root = Path(tmp).resolve()
        jobs = []
        for row in rows:
            chart_type, name = chart_type_of(row["SubQType"]), row["FileName"]
            src = tables / f"{name}.xlsx"
            if compat:
                table_dir = root / "tables"
                table_dir.mkdir(exist_ok=True)
                if src.is_file() and not (table_dir / src.name).exists():
                    shutil.copyfile(src, table_dir / src.name)
                stage1, stage2 = official_sources(row["Prediction"], str(table_dir / f"{name}.xlsx"), chart_type)
                jobs.append({"id": row["id"], "stage1": stage1, "stage2": stage2})
                continue
            source = corrected_source(row["Prediction"])
            if not _is_usable(src):
                out[row["id"]] = _outcome(None, None, "input_missing")
            elif source is None:
                out[row["id"]] = _outcome(False, False, "no_code")
            else:
                row_dir = root / "rows" / str(row["id"])
                row_dir.mkdir(parents=True)
                for dest in ("table.xlsx", f"{name}.xlsx"):
                    shutil.copyfile(src, row_dir / dest)
                _csv_for(Path(data_dir), name, src, row_dir / "table.csv")
                if (row_dir / "table.csv").exists():
                    shutil.copyfile(row_dir / "table.csv", row_dir / f"{name}.csv")
                jobs.append({"id": row["id"], "source": source, "chart_type": chart_type, "dir": str(row_dir)})
        results = sandbox.run_jobs("official" if compat else "corrected", jobs, root, timeout_s) if jobs else {}
    by_id = {r["id"]: r for r in rows}
    for rid, res in results.items():
        row, seconds = by_id[rid], res.get("seconds")
        chart_type = chart_type_of(row["SubQType"])
        if res.get("timeout"):
            out[rid] = _outcome(False, False, "timeout", seconds, "None" if compat else None)
        elif not res.get("ecr"):
            out[rid] = _outcome(False, False, "exec_error", seconds, "None" if compat else None)
        elif compat:
            raw = official_pass(res.get("output", ""), row["Reference"], chart_type)
            reason = "pass" if raw is True else {"None": "values_error", "False": "parse_error"}.get(raw, "mismatch")
            out[rid] = _outcome(True, raw is True, reason, seconds, raw)
        elif res.get("values") is None:
            out[rid] = _outcome(True, False, "values_error", seconds)
        else:
            try:
                ok = corrected_match(res["values"], row["Reference"], chart_type)
            except (ValueError, SyntaxError, TypeError):
                out[rid] = _outcome(True, None, "reference_unparseable", seconds)
                continue
            out[rid] = _outcome(True, ok, "pass" if ok else "mismatch", seconds)
        out[rid]["chart_error"] = res.get("error")
    return out
