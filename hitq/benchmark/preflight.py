"""Turn a Query + RunConfig into the final, fitted chat messages (`prepare_query`, the single
place that does it, for `hitq preflight` and for every job a worker runs), and report what all
queries of a run would look like before a GPU is touched (`preflight`)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from hitq.benchmark import fitting, prompts, tables
from hitq.benchmark.query import Query
from hitq.engine.base import ImageLimits, TokenCount
from hitq.errors import JobError, TooLong
from hitq.runconfig import RunConfig

CountTokens = Callable[[list[dict], ImageLimits], TokenCount]


def prepare_query(query: Query, config: RunConfig, prompt_set: prompts.PromptSet,
                  count_tokens: CountTokens) -> fitting.Fitted:
    """Read the inputs (MissingInput), build the messages for the run's protocol and fit them
    into `config.max_input_tokens` (TooLong). The result's `token_count` is the TokenCount of
    the final messages (tokens, image pixels before/after resizing, image tokens)."""
    modality, fmt = config.modality, config.format
    image = str(tables.check_image(config.data_dir, query.file_name)) if modality != "text" else None
    table = tables.read_table(config.data_dir, fmt, query.file_name) if prompts.uses_table(
        modality, config.protocol) else None
    render = prompts.prompt_builder(query, modality, fmt, prompt_set, config.protocol, image, config.mix_says_latex,
                                    config.table_first)
    limits = ImageLimits(config.min_pixels, config.max_pixels)
    measured: dict[int, TokenCount] = {}

    def count(messages: list[dict]) -> int:
        result = count_tokens(messages, limits)
        measured[id(messages)] = result
        return result.tokens

    if table is None:
        messages = render(None)
        tokens = count(messages)
        if tokens > config.max_input_tokens:
            raise TooLong(f"prompt needs {tokens} tokens (image included); budget {config.max_input_tokens}")
        fitted = fitting.Fitted(messages, None, tokens, tokens)
    else:
        fitted = fitting.fit(table, fmt, render, count, config.max_input_tokens)
    fitted.token_count = measured[id(fitted.messages)]
    return fitted


def preflight(queries: Iterable[Query], config: RunConfig, prompt_set: prompts.PromptSet,
              count_tokens: CountTokens, progress: Callable[[int], None] | None = None) -> dict:
    """Prepare every query without generating; per-query sizes plus a summary. Job errors
    (missing input, too long, bad input) are recorded per query, not raised."""
    rows = []
    for n, q in enumerate(queries, 1):
        row = {"id": q.id, "file": q.file_name, "original_tokens": None, "input_tokens": None, "truncated": False,
               "rows_dropped": 0, "cut_inside_row": False, "image_pixels": None, "image_pixels_after": None,
               "error": None}
        try:
            f = prepare_query(q, config, prompt_set, count_tokens)
            row.update(original_tokens=f.original_tokens, input_tokens=f.input_tokens, truncated=f.truncated,
                       rows_dropped=f.rows_dropped, cut_inside_row=f.cut_inside_row,
                       image_pixels=f.token_count.image_pixels_before,
                       image_pixels_after=f.token_count.image_pixels_after)
        except JobError as e:
            row["error"] = f"{e.kind}: {e}"
        rows.append(row)
        if progress:
            progress(n)
    return {"queries": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> dict:
    sizes = sorted(r["input_tokens"] for r in rows if r["input_tokens"] is not None)
    originals = [r["original_tokens"] for r in rows if r["original_tokens"] is not None]
    kinds = Counter(r["error"].split(":", 1)[0] for r in rows if r["error"])
    return {
        "n": len(rows),
        "ok": len(sizes),
        "p50": _percentile(sizes, 0.5),
        "p90": _percentile(sizes, 0.9),
        "max": sizes[-1] if sizes else None,
        "max_original": max(originals) if originals else None,
        "truncated": sum(1 for r in rows if r["truncated"]),
        "cut_inside_row": sum(1 for r in rows if r["cut_inside_row"]),
        "errors": sum(kinds.values()),
        "errors_by_kind": dict(sorted(kinds.items())),
    }


def _percentile(sorted_values: list[int], q: float) -> int | None:
    """Nearest-rank percentile."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 1))
    return sorted_values[int(rank) - 1]


def dump_prompt(messages: list[dict]) -> str:
    """Human-readable text of messages for `--dump DIR`: each turn's role, then its parts
    (text verbatim, images as their path)."""
    out = []
    for m in messages:
        out.append(f"===== {m['role']} =====\n")
        content = m["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for p in parts:
            out.append(p["text"] if p.get("type") == "text" else f"[image: {p.get('image')}]\n")
        out.append("\n")
    return "".join(out)
