"""A run's settings: fixed at enqueue, stored as JSON with the run, hashed to detect changes."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields


@dataclass(frozen=True)
class RunConfig:
    modality: str  # text | image | mix
    format: str  # html | markdown | latex | csv | json
    data_dir: str
    model_dir: str | None
    engine: str = "transformers"  # transformers | fake
    qa_file: str = "QA_final.json"
    prompts: str = "default"  # "default", "official" or a path to a prompt-set JSON file
    prompts_hash: str = ""  # sha256 of the prompt set's JSON, so an edited file is a new config
    protocol: str = "corrected"  # corrected | predecessor | official (message layout)
    mix_says_latex: bool = False  # reproduce the predecessor's "mix always says latex" quirk
    sc_protocol: str = "gold"  # gold: derive SC answers and use the _swap tables
    max_input_tokens: int = 100_000  # budget for the whole chat prompt, images included
    min_pixels: int = 4 * 32 * 32
    max_pixels: int = 1280 * 32 * 32
    max_new_tokens: int | None = None  # None: by question type (benchmark.prompts.default_max_new_tokens)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    format_retries: int = 1  # extra tries with the format reminder when [Final Answer] is missing
    table_first: bool = False  # opt-in layout that changes the prompt (shares the table across templates)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def hash(self) -> str:
        return config_hash(self.to_json())

    def diff(self, other: "RunConfig") -> list[str]:
        """Lines `key: old -> new` for every setting that differs."""
        a, b = self.to_json(), other.to_json()
        return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def config_hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
