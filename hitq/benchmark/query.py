"""One benchmark question as hitq stores it (a row of QA_final.json, SC already derived)."""
from __future__ import annotations

from dataclasses import dataclass

MODALITIES = ("text", "image", "mix")
FORMATS = ("html", "markdown", "latex", "csv", "json")
# File extension of each text format inside <data>/<format>/ (realhitbench.md, section a).
EXTENSIONS = {"html": "html", "markdown": "md", "latex": "txt", "csv": "csv", "json": "json"}


@dataclass(frozen=True)
class Query:
    id: int
    file_name: str  # table stem, `_swap` already appended for Structure Comprehending
    question_type: str
    sub_q_type: str
    question: str
    reference: str  # FinalAnswer, or ProcessedAnswer for Visualization (what scoring compares)
    final_answer: str = ""
    processed_answer: str = ""

    @property
    def template_key(self) -> str:
        """Prompt template: SubQType for Data Analysis, else QuestionType (both codebases)."""
        return self.sub_q_type if self.question_type == "Data Analysis" else self.question_type


def prefix_key(modality: str, fmt: str, file_name: str, template_key: str | None) -> str:
    """Jobs with equal keys share their prompt up to the question (task text, image, table).
    template_key None: the table-first layout, where every template shares the table."""
    import hashlib

    return hashlib.sha1(f"{modality}\0{fmt}\0{file_name}\0{template_key or '*'}".encode()).hexdigest()[:16]


def job_row(query: Query, modality: str, fmt: str, missing: str | None = None, table_first: bool = False) -> dict:
    """The queue row for `query`: pending, or error/missing_input with the reason."""
    row = {
        "query_id": query.id, "file_name": query.file_name, "question_type": query.question_type,
        "sub_q_type": query.sub_q_type, "question": query.question, "reference": query.reference,
        "prefix_key": prefix_key(modality, fmt, query.file_name, None if table_first else query.template_key),
        "status": "pending", "priority": 0,
    }
    if missing:
        row.update(status="error", error_kind="missing_input", error_message=missing)
    return row


def job_rows(queries: list[Query], modality: str, fmt: str, missing: dict | None = None, table_first: bool = False) -> list[dict]:
    """The queue rows of `queries`, chart groups first: every job of a prefix group that holds a
    Visualization question gets priority 1, so workers claim them before the rest. A chart answer
    is up to 2,048 tokens, one decode step each; started first, its steps run beside everyone
    else's prefills and answers instead of trailing alone at the end of a worker's run."""
    rows = [job_row(q, modality, fmt, (missing or {}).get(q.id), table_first) for q in queries]
    charts = {r["prefix_key"] for r in rows if r["question_type"] == "Visualization"}
    for r in rows:
        r["priority"] = int(r["prefix_key"] in charts)
    return rows
