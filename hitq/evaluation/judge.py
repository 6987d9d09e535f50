"""LLM judge for Summary/Anomaly Analysis through an OpenAI-compatible ``/chat/completions`` endpoint.

Prompts: a JSON file laid out like ``prompts-official.json`` (``{"eval_prompts": {SubQType: template}}``)
or a bare ``{SubQType: template}`` mapping. Placeholders ``{question}``, ``{reference_answer}``,
``{user_answer}`` and ``{table}`` are substituted in one pass (inserted text is never re-scanned).

Corrections over the official judge (defect 11): temperature 0, the model name recorded, the score
parsed strictly from the last ``[Score]: <number>`` (else ``Score: <number>``) into a number or
``None``, the raw reply kept, and a failing call never removes the row's other scores.
The API key comes only from the environment variable ``HITQ_JUDGE_API_KEY``; it is sent as a bearer
header and never logged, printed or stored.
"""
from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from hitq.errors import DataError, UsageError

API_KEY_ENV = "HITQ_JUDGE_API_KEY"
_PLACEHOLDER = re.compile(r"\{(table|question|reference_answer|user_answer)\}")
_SCORE = (re.compile(r"\[Score\]:\s*\**\s*(\d+(?:\.\d+)?)"), re.compile(r"Score:\s*\**\s*(\d+(?:\.\d+)?)"))
_TABLE_EXT = {"html": "html", "markdown": "md", "latex": "txt", "csv": "csv", "json": "json"}


def load_prompts(path: str | Path) -> dict[str, str]:
    """SubQType -> template, from a prompts file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read judge prompts {path}: {exc}") from None
    prompts = data.get("eval_prompts", data) if isinstance(data, dict) else None
    if not isinstance(prompts, dict):
        raise DataError(f"{path}: expected {{'eval_prompts': {{SubQType: template}}}}")
    return {k: v for k, v in prompts.items() if isinstance(v, str) and not k.startswith("_")}


def fill(template: str, values: dict[str, str]) -> str:
    """Substitute placeholders in one pass, so braces inside the inserted table stay literal."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def parse_score(reply: str) -> float | None:
    """The number after the last ``[Score]:`` (else ``Score:``), clamped to 0-100, or None."""
    for pattern in _SCORE:
        found = pattern.findall(reply or "")
        if found:
            return max(0.0, min(100.0, float(found[-1])))
    return None


class Judge:
    """Callable judge: ``judge(row) -> {"Judge": score|None, "judge_raw": reply, "judge_model": model}``."""

    def __init__(self, url: str, model: str, prompts: dict[str, str], data_dir: str | Path | None = None,
                 table_format: str = "latex", timeout_s: float = 120.0):
        self.api_key = os.environ.get(API_KEY_ENV, "")
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        if not self.url.startswith(("http://", "https://")):
            raise UsageError(f"--judge-url must be an http(s) URL, got {url!r}")
        self.model, self.prompts, self.timeout_s = model, prompts, timeout_s
        self.data_dir, self.table_format = (Path(data_dir) if data_dir else None), table_format

    def __repr__(self) -> str:  # never show the key
        return f"Judge(url={self.url!r}, model={self.model!r})"

    def _table(self, file_name: str) -> str:
        if self.data_dir is None:
            return ""
        path = self.data_dir / self.table_format / f"{file_name}.{_TABLE_EXT.get(self.table_format, self.table_format)}"
        try:
            with open(path, encoding="utf-8", errors="ignore") as fh:
                return fh.read()
        except OSError:
            return ""

    def prompt_for(self, row: dict) -> str | None:
        template = self.prompts.get(row["SubQType"])
        if template is None:
            return None
        return fill(template, {"question": row["Question"], "reference_answer": row["Reference"],
                               "user_answer": row["Prediction"],
                               "table": self._table(row["FileName"]) if "{table}" in template else ""})

    def ask(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            data = json.loads(response.read().decode("utf-8"))
        return data["choices"][0]["message"]["content"] or ""

    def __call__(self, row: dict) -> dict:
        prompt = self.prompt_for(row)
        if prompt is None:
            return {"Judge": None, "judge_raw": None, "judge_error": f"no prompt for {row['SubQType']!r}"}
        try:
            reply = self.ask(prompt)
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            # the message may echo the URL but never the headers, so the key cannot leak here
            return {"Judge": None, "judge_raw": None, "judge_error": f"{type(exc).__name__}: {exc}"[:300]}
        return {"Judge": parse_score(reply), "judge_raw": reply, "judge_model": self.model}
