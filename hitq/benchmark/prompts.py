"""Prompt sets (template data) and protocols (how a prompt is laid out as chat messages).

A prompt set is a JSON file in the layout of `realhitbench/prompts-official.json`:
`task_prompts[modality][template_key]`, `user_prompt` (with {table}, {question},
{answer_format}), `answer_format` (exploratory_analysis / visualization / default) and
`model_first_response`. hitq ships its own set (`prompts_default.json`, spec "default").

Protocols:

* ``predecessor`` -- exactly the predecessor's assembly (realhitbench.md section d): one user
  turn, `TASK + "\\n" + USER`, image part first for image/mix, `[See the table image]` as the
  table in the image modality, and the mix task text left as written, so with the official set
  every mix prompt claims "latex format" whatever format is inserted.
* ``official`` -- the benchmark authors' layouts: text is three turns (user TASK, assistant
  `model_first_response`, user USER); image/mix are one user turn with the text first and the
  image after it, and the image modality fills {table} with the text table. The official image
  preprocessing (stretching to a square) is not reproduced: images go through the engine's
  pixel limits like every other protocol.
* ``corrected`` (hitq's default) -- the predecessor layout with the mix task text stating the
  format actually inserted: a `{format}` placeholder is filled with the real format, and in a
  template without one (the official set) the phrase "table in latex format" is rewritten to
  "table in <format> format". `mix_says_latex=True` keeps the predecessor's wording.

Placeholders are substituted in one pass, so braces inside table text are never re-scanned.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from hitq.benchmark.query import FORMATS, MODALITIES, Query
from hitq.errors import UsageError

PROTOCOLS = ("corrected", "predecessor", "official")
TEMPLATE_KEYS = (
    "Fact Checking", "Numerical Reasoning", "Structure Comprehending", "Rudimentary Analysis",
    "Summary Analysis", "Predictive Analysis", "Exploratory Analysis", "Anomaly Analysis", "Visualization",
)
IMAGE_TABLE_VALUE = "[See the table image]"
# The predecessor's sequential retry note (quote left open as in its source).
RETRY_NOTE = ('\nNote: Please check your output format. You do not need to do much explaining, '
              'just give the final answer in the given format: "[Final Answer]: ')
_PLACEHOLDER = re.compile(r"\{(table|question|answer_format)\}")
_FORMAT = re.compile(r"\{format\}")
_MIX_LATEX = "table in latex format"


@dataclass(frozen=True)
class PromptSet:
    name: str  # "default", "official" or the file path given
    path: str
    sha256: str  # of the file bytes: an edited file makes a new run config
    task_prompts: dict  # modality -> template key -> task text
    user_prompt: str
    answer_formats: dict  # exploratory_analysis | visualization | default -> text
    model_first_response: str

    def answer_format(self, query: Query) -> str:
        """The answer-format text (same rule, same order, in official and predecessor code)."""
        if query.sub_q_type == "Exploratory Analysis":
            return self.answer_formats["exploratory_analysis"]
        if query.question_type == "Visualization":
            return self.answer_formats["visualization"]
        return self.answer_formats["default"]

    def task(self, modality: str, query: Query) -> str:
        try:
            return self.task_prompts[modality][query.template_key]
        except KeyError:
            raise UsageError(
                f"prompt set {self.name} has no {modality} template for {query.template_key!r} (query {query.id})"
            ) from None


def load_prompt_set(spec: str, data_dir: str | None = None) -> PromptSet:
    """"default" (packaged), "official" (`<data_dir>/prompts-official.json`) or a JSON file path."""
    if spec == "default":
        raw = resources.files("hitq.benchmark").joinpath("prompts_default.json").read_bytes()
        return _parse(raw, "default", "hitq/benchmark/prompts_default.json")
    if spec == "official":
        path = Path(data_dir or ".").expanduser() / "prompts-official.json"
        if not path.is_file():
            raise UsageError(
                f"--prompts official needs {path}; pass --prompts FILE with the path of prompts-official.json"
            )
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UsageError(f"prompt set file not found: {path}")
    return _parse(path.read_bytes(), spec, str(path))


def _parse(raw: bytes, name: str, where: str) -> PromptSet:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"prompt set {where} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"prompt set {where} is not a JSON object")
    tasks = data.get("task_prompts")
    for modality in MODALITIES:
        group = tasks.get(modality) if isinstance(tasks, dict) else None
        missing = [k for k in TEMPLATE_KEYS if not isinstance((group or {}).get(k), str)]
        if missing:
            raise UsageError(f"prompt set {where}: task_prompts.{modality} lacks {', '.join(missing)}")
    formats = data.get("answer_format")
    need = ("exploratory_analysis", "visualization", "default")
    if not isinstance(formats, dict) or not all(isinstance(formats.get(k), str) for k in need):
        raise UsageError(f"prompt set {where}: answer_format needs string values for {', '.join(need)}")
    user = data.get("user_prompt")
    if not isinstance(user, str) or "{table}" not in user or "{question}" not in user:
        raise UsageError(f"prompt set {where}: user_prompt must be a string with {{table}} and {{question}}")
    return PromptSet(
        name=name, path=where, sha256=hashlib.sha256(raw).hexdigest(), task_prompts=tasks, user_prompt=user,
        answer_formats={k: formats[k] for k in need},
        model_first_response=str(data.get("model_first_response", "")),
    )


def fill(template: str, **values: str) -> str:
    """Substitute {table}/{question}/{answer_format} in one pass (inserted text is not re-scanned)."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), template)


OFFICIAL_ANSWER_FORMATS = {
    "exploratory_analysis": "CorrelationRelation, CorrelationCoefficient",
    "visualization": "import pandas as pd \n import matplotlib.pyplot as plt \n ... plt.show()",
    "default": "AnswerName1, AnswerName2...",
}


def answer_format(query: Query, prompt_set: PromptSet | None = None) -> str:
    """The answer-format text of `prompt_set` (the official texts when None)."""
    if prompt_set is not None:
        return prompt_set.answer_format(query)
    if query.sub_q_type == "Exploratory Analysis":
        return OFFICIAL_ANSWER_FORMATS["exploratory_analysis"]
    if query.question_type == "Visualization":
        return OFFICIAL_ANSWER_FORMATS["visualization"]
    return OFFICIAL_ANSWER_FORMATS["default"]


def task_text(prompt_set: PromptSet, query: Query, modality: str, fmt: str, protocol: str,
              mix_says_latex: bool = False) -> str:
    """The task (instructions) part of the prompt for this protocol."""
    text = prompt_set.task(modality, query)
    if modality == "text":
        return _FORMAT.sub(lambda _: fmt, text)
    says_latex = modality == "mix" and (protocol != "corrected" or mix_says_latex)
    if modality == "mix" and not says_latex and "{format}" not in text:
        text = text.replace(_MIX_LATEX, f"table in {fmt} format", 1)
    return _FORMAT.sub(lambda _: "latex" if says_latex else fmt, text)


def uses_table(modality: str, protocol: str) -> bool:
    """Whether the {table} slot takes the text table (else the image-modality placeholder)."""
    return modality != "image" or protocol == "official"


def check_layout(protocol: str, table_first: bool) -> None:
    """The table-first layout exists only for hitq's own (corrected) protocol."""
    if table_first and protocol != "corrected":
        raise UsageError(f"--table-first is hitq's own layout: use it with --protocol corrected, not {protocol}")


def prompt_builder(
    query: Query, modality: str, fmt: str, prompt_set: PromptSet, protocol: str = "corrected",
    image: str | None = None, mix_says_latex: bool = False, table_first: bool = False,
) -> Callable[[str | None], list[dict]]:
    """A function table_text -> messages; everything but the table is computed once, so fitting
    can rebuild the messages for many candidate tables cheaply.

    table_first (opt-in, `corrected` protocol only) moves the table (the user prompt up to and
    including {table}) before the task text: every question on a table then shares its prompt
    up to the end of the table, whatever its template, so the table is prefilled once per table
    instead of once per (table, template). It changes the prompt, so runs record it."""
    if modality not in MODALITIES:
        raise UsageError(f"unknown modality {modality!r}; choose one of: {', '.join(MODALITIES)}")
    if fmt not in FORMATS:
        raise UsageError(f"unknown table format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    if modality != "text" and image is None:
        raise ValueError(f"{modality} prompts need an image path")
    check_layout(protocol, table_first)
    task = task_text(prompt_set, query, modality, fmt, protocol, mix_says_latex)
    answer_format = prompt_set.answer_format(query)
    # Split the user prompt around {table} once (question and format are fixed per query).
    marker = "\x00TABLE\x00"
    user = fill(prompt_set.user_prompt, table=marker, question=query.question, answer_format=answer_format)
    before, after = user.split(marker, 1)
    table_slot = uses_table(modality, protocol)

    def messages_for(table: str | None) -> list[dict]:
        if table_slot and table is None:
            raise ValueError(f"{modality}/{protocol} prompts need the table text")
        user_filled = before + (table if table_slot else IMAGE_TABLE_VALUE) + after
        if protocol == "official" and modality == "text":
            return [
                {"role": "user", "content": [{"type": "text", "text": task}]},
                {"role": "assistant", "content": [{"type": "text", "text": prompt_set.model_first_response}]},
                {"role": "user", "content": [{"type": "text", "text": user_filled}]},
            ]
        if table_first:
            table_part = before + (table if table_slot else IMAGE_TABLE_VALUE)
            text = {"type": "text", "text": table_part.lstrip("\n") + "\n" + task + after}
        else:
            text = {"type": "text", "text": task + "\n" + user_filled}
        if modality == "text":
            return [{"role": "user", "content": [text]}]
        picture = {"type": "image", "image": image}
        content = [text, picture] if protocol == "official" else [picture, text]
        return [{"role": "user", "content": content}]

    return messages_for


def build_messages(
    query: Query, table: str | None, modality: str, fmt: str, prompt_set: PromptSet,
    protocol: str = "corrected", image: str | None = None, mix_says_latex: bool = False, table_first: bool = False,
) -> list[dict]:
    """Chat messages (transformers layout) for one query; see the module docstring."""
    return prompt_builder(query, modality, fmt, prompt_set, protocol, image, mix_says_latex, table_first)(table)


def reminder(messages: list[dict], answer_format: str) -> list[dict]:
    """Messages for a retry after a response without `[Final Answer]:`: the predecessor's note
    appended to the last text part of the last user turn (a fresh request, not a continuation)."""
    out = copy.deepcopy(messages)
    last_user = next(m for m in reversed(out) if m["role"] == "user")
    texts = [p for p in last_user["content"] if p.get("type") == "text"]
    texts[-1]["text"] += RETRY_NOTE + answer_format
    return out


def default_max_new_tokens(query: Query) -> int:
    """Generation cap when the run does not set one. Generation stops at the completed
    `[Final Answer]:` line for everything but charts, so the cap only bounds runaway outputs:
    512 for short answers (the templates ask for step-by-step thinking, which can exceed 256
    tokens on Numerical Reasoning), 1024 for Summary/Anomaly Analysis (a prose answer after the
    reasoning), 2048 for Visualization (complete plotting code, often with the data inlined)."""
    if query.question_type == "Visualization":
        return 2048
    if query.sub_q_type in ("Summary Analysis", "Anomaly Analysis"):
        return 1024
    return 512


def is_open_ended(query: Query) -> bool:
    """True when the answer continues past the `[Final Answer]:` line (chart code), so decoding
    must not stop when that line is complete."""
    return query.question_type == "Visualization"
