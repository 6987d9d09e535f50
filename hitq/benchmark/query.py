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
