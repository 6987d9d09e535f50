"""Build a tiny, random-weight Qwen3-VL model directory (`hitq model tiny DIR`).

The directory has every file the real Qwen3-VL-8B-Instruct has (config, weights, generation
config, image/video processor configs, tokenizer, chat template), so it loads through exactly the
same `AutoProcessor.from_pretrained` / `AutoModelForImageTextToText.from_pretrained` path as the
real model. Only the sizes differ: a 2-layer text model with hidden size 64, a 2-block vision
tower, and a byte-level BPE tokenizer of ~3k tokens trained offline on a small built-in corpus,
carrying Qwen's 26 added tokens (`<|im_start|>`, `<|image_pad|>`, ...) so the chat template and
the processor's image-placeholder expansion behave as with the real model.

The config is written in the layout of the official `config.json` (`rope_scaling`,
`rope_theta`), which transformers 4.57 and 5.x both load. Weights are drawn from a seeded
generator in sorted parameter order, so one seed gives one set of weights.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

#: Qwen's added tokens, in id order (151643..151668 in the real tokenizer), and whether special.
ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]
ADDITIONAL_SPECIAL_TOKENS = [t for t, special in ADDED_TOKENS[1:14] if special]

# Qwen2's pre-tokenizer split (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

BPE_VOCAB_SIZE = 3000  # target; the corpus decides the final count (printed into config.json)

# Text the tokenizer is trained on: the RealHiTBench prompt vocabulary, table markup and numbers.
_CORPUS = """\
# Role Play
Suppose you are an expert in table analysis and your task is to provide answers to questions based
on the content of the table. Let's think step by step as follows and make the most of your strengths
as a table analysis expert.
1. Fully understand the question and extract the necessary information from it.
2. Clearly and comprehensively understand the content of the table, including the structure of the
table, the meaning and formatting of each row and column header. Note: there is usually a summative
cell in the table, such as all, combine, total, sum, average, mean, etc. Please pay careful attention
to the flag information in the row header and column header.
3. Based on the question, select the row and column headers in the table that are most relevant to it
and find the corresponding cells based on them.
4. According to the requirements of the question, perform statistical, calculation, ranking, or other
operations on the cells you selected, and output the answer in the format specified by the definition.
# Output Control
The final answer should be one-line and strictly follow the format: "[Final Answer]: AnswerName1, AnswerName2...".
Ensure the AnswerName is a number or entity name, as short as possible, without any explanation.
If the question is judgmental, please answer 'Yes' or 'No'.
I will give you a table in html format and a question, please use the table to answer the question.
I will give you a table in markdown format, latex format, csv format, json format, or an image.
Let's get start!
# Table
# Question
Emphasize: you need to make sure your final answer is formatted in this way: [Final Answer]: Yes
[Final Answer]: No
[Final Answer]: CorrelationRelation, CorrelationCoefficient
[Final Answer]: Weak positive correlation, 0.23
import pandas as pd
import matplotlib.pyplot as plt
df = pd.read_excel('table.xlsx')
plt.figure(figsize=(10, 6))
plt.bar(df['Year'], df['Total'])
plt.xlabel('Year')
plt.ylabel('Value')
plt.title('Total by year')
plt.show()
Fact Checking, Numerical Reasoning, Structure Comprehending, Data Analysis, Visualization,
Rudimentary Analysis, Summary Analysis, Predictive Analysis, Exploratory Analysis, Anomaly Analysis.
Which country has the highest value? What is the difference between the two years? How many rows
are there? What was the percentage change from the previous year? Is the trend increasing or
decreasing? Describe this image. The picture shows a table with rows and columns.
economy, society, science, sports, health, education, population, income, revenue, expenditure,
million, billion, percent, rate, growth, number, count, year, month, quarter, region, state, city,
male, female, age, group, total, subtotal, average, median, minimum, maximum, other, unknown.
The quick brown fox jumps over the lazy dog. Hello world! Hello, world.
<table border="1" class="dataframe"><thead><tr><th>Year</th><th colspan="2">Total</th></tr></thead>
<tbody><tr><td rowspan="3">2019</td><td>12.5</td><td>1,234</td></tr></tbody></table>
<html><head><meta charset="utf-8"></head><body></body></html>
| Year | Country | Value |
| --- | --- | --- |
| 2020 | United States | 1,234.5 |
\\begin{tabular}{|l|c|r|} \\hline Year & Total & Share \\\\ \\hline \\multicolumn{2}{c}{Total} \\end{tabular}
{"columns": ["Year", "Total"], "data": [[2019, 12.5], [2020, null]], "index": [0, 1]}
Year,Country,Value,Share (%)
2019,"Korea, Republic of",1234.5,-0.7
"""

_WORDS = """\
the of and to in is was for on are as with by at from that this be or an it not which have has had were
but all their there been one two three four five six seven eight nine ten hundred thousand first second
third last next previous new old high low large small more most less least many much each every both
other same different between among during before after above below under over into through about
against within without since until while where when what who whom whose why how than then also only
very just such can could will would should may might must shall do does did done make made take taken
give given show shown find found use used compare compared increase increased decrease decreased change
changed rank ranked list listed include included calculate calculated determine identify analyze
analysis answer answers question questions table tables row rows column columns cell cells header
headers value values data number numbers percentage proportion ratio share difference sum mean median
mode range variance deviation standard correlation coefficient relation positive negative strong weak
moderate trend forecast predict prediction future past present period periods annual monthly weekly
daily yearly fiscal calendar estimate estimated actual projected target budget cost costs price prices
sales profit loss margin tax taxes rate rates wage wages salary employment unemployment labor labour
force worker workers employee employees industry industries sector sectors manufacturing agriculture
construction services trade retail wholesale transport transportation finance insurance real estate
energy oil gas electricity coal water food housing rent household households family families person
persons people children adults students teachers schools school university college degree enrollment
graduates hospital hospitals patients doctors disease deaths births marriage divorce crime police
election votes party candidate government federal national provincial local public private county
district country countries world nation nations Africa America Asia Europe Oceania Australia Canada
China France Germany India Italy Japan Korea Mexico Russia Spain Brazil Kingdom States United Republic
north south east west northern southern eastern western central urban rural metropolitan area areas
land square kilometers miles meters tons tonnes dollars euros pounds yen yuan units unit level levels
grade class type types category categories item items product products goods export exports import
imports domestic foreign international market markets bank banks loan loans debt credit interest
investment investments capital asset assets liability revenue revenues expense expenses spending
income incomes gross net domestic product inflation index indices consumer producer figure figures
chart charts graph line bar pie scatter plot axis legend label labels title color colors size
January February March April May June July August September October November December Monday Friday
Jan Feb Mar Apr Jun Jul Aug Sep Oct Nov Dec Q1 Q2 Q3 Q4 FY H1 H2 Mr Mrs Dr No Yes True False None N/A
source sources note notes footnote estimate revised preliminary excluding including except respectively
age aged years old under over male males female females men women boys girls total totals overall
"""


def _corpus() -> list[str]:
    """The built-in training lines: prose above, plus numbers and table cells in many shapes."""
    lines = _CORPUS.splitlines() + _WORDS.splitlines()
    words = _WORDS.split()
    lines += [" ".join(words[i::7]) for i in range(7)] + [" ".join(w.lower() for w in words[::-1])]
    lines += [" ".join(w.capitalize() for w in words)] + [",".join(words[::3])]
    lines += [" ".join(str(n) for n in range(start, start + 50)) for start in range(0, 2100, 50)]
    lines += [f"<td>{n / 10:.1f}</td><td>{n * 37 % 1000:,}</td><td>{n % 97}%</td>" for n in range(0, 2000, 7)]
    lines += [f"| {1990 + n % 35} | {n * 13 % 997} | {n / 7:.2f} |" for n in range(300)]
    return lines


def train_tokenizer():
    """Train the byte-level BPE tokenizer (deterministic) and add Qwen's added tokens after it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_tokens(
        [AddedToken(t, special=s, normalized=False, lstrip=False, rstrip=False, single_word=False) for t, s in ADDED_TOKENS]
    )
    return tok


def chat_template() -> str:
    """Qwen3-VL-8B-Instruct's chat template, shipped as package data."""
    return resources.files("hitq.engine").joinpath("chat_template.jinja").read_text(encoding="utf-8")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _config(vocab_size: int, ids: dict[str, int]) -> dict:
    """config.json in the official Qwen3-VL layout, with tiny sizes."""
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": ids["<|image_pad|>"],
        "model_type": "qwen3_vl",
        "text_config": {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": ids["<|endoftext|>"],
            "dtype": "float32",
            "eos_token_id": ids["<|im_end|>"],
            "head_dim": 16,
            "hidden_act": "silu",
            "hidden_size": 64,
            "initializer_range": 0.02,
            "intermediate_size": 128,
            "max_position_embeddings": 262144,
            "model_type": "qwen3_vl_text",
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-06,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [2, 3, 3], "rope_type": "default"},
            "rope_theta": 5000000,
            "use_cache": True,
            "vocab_size": vocab_size,
        },
        "tie_word_embeddings": False,
        "transformers_version": "4.57.0",
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": {
            "deepstack_visual_indexes": [0, 1],
            "depth": 2,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 32,
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": 64,
            "model_type": "qwen3_vl",
            "num_heads": 2,
            "num_position_embeddings": 256,
            "out_hidden_size": 64,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
    }


def _tokenizer_config(ids: dict[str, int], template: str) -> dict:
    decoder = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": s}
        for t, s in ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ADDITIONAL_SPECIAL_TOKENS,
        "bos_token": None,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _processor_config(video: bool) -> dict:
    """The official (pre)processor configs: the same pixel limits as the real model."""
    config = {
        "size": {"longest_edge": 25165824, "shortest_edge": 4096} if video else {"longest_edge": 16777216, "shortest_edge": 65536},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor",
    }
    if video:
        config["video_processor_type"] = "Qwen3VLVideoProcessor"
    else:
        config["image_processor_type"] = "Qwen2VLImageProcessorFast"
    return config


def random_state_dict(config_dict: dict, seed: int = 0, std: float = 0.02, head_std: float = 0.5) -> dict:
    """Seeded random weights for the architecture described by `config_dict`.

    Norm weights are one and biases zero; other tensors are N(0, std), except `lm_head`, which is
    drawn wider (head_std) so the random model's logits have clear winners: greedy decoding then
    does not flip between equal-looking tokens because of padding or batch-size rounding noise.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    norm_params = {
        f"{mname}.{pname}" if mname else pname
        for mname, module in model.named_modules()
        if "norm" in type(module).__name__.lower()
        for pname, _ in module.named_parameters(recurse=False)
    }
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in sorted(model.state_dict().items()):
        if name in norm_params:
            value = torch.ones(param.shape) if name.endswith("weight") else torch.zeros(param.shape)
        elif name.endswith("bias"):
            value = torch.zeros(param.shape)
        else:
            value = torch.randn(param.shape, generator=gen) * (head_std if name.startswith("lm_head") else std)
        state[name] = value.to(torch.float32).contiguous()
    return state


def build_tiny_model(out_dir: str | Path, seed: int = 0, teach_steps: int = 120) -> Path:
    """Write a tiny random Qwen3-VL model directory to `out_dir` and return its path.

    The directory loads with `AutoProcessor.from_pretrained` and
    `AutoModelForImageTextToText.from_pretrained`; the same seed gives the same files.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = chat_template()

    tok = train_tokenizer()
    ids = {t: tok.token_to_id(t) for t, _ in ADDED_TOKENS}
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out), None)  # vocab.json + merges.txt, for slow/rebuilding loaders
    _write_json(out / "tokenizer_config.json", _tokenizer_config(ids, template))
    _write_json(out / "chat_template.json", {"chat_template": template})

    config = _config(vocab_size, ids)
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": ids["<|endoftext|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "do_sample": True,
            "top_k": 20,
            "top_p": 0.8,
            "repetition_penalty": 1.0,
            "temperature": 0.7,
            "transformers_version": "4.56.0",
        },
    )
    _write_json(out / "preprocessor_config.json", _processor_config(video=False))
    _write_json(out / "video_preprocessor_config.json", _processor_config(video=True))
    state = teach_answer_format(random_state_dict(config, seed), config, out, seed, teach_steps)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


ANSWER = "[Final Answer]: 42"  # what the taught tiny model says after any prompt


def _table_like_image(width: int, height: int, rng):
    """White page, grid lines and words: what rendered benchmark tables look like."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    words = " ".join(_corpus()).split()
    step_x, step_y = rng.randint(40, 120), rng.randint(14, 24)
    for y in range(0, height, step_y):
        draw.line([(0, y), (width, y)], fill="black")
        for x in range(0, width, step_x):
            draw.text((x + 2, y + 2), rng.choice(words)[:8], fill="black")
    for x in range(0, width, step_x):
        draw.line([(x, 0), (x, height)], fill="black")
    return image


def teach_answer_format(state: dict, config_dict: dict, out: Path, seed: int = 0, steps: int = 120) -> dict:
    """A few seeded optimiser steps so that, after the assistant header, the tiny model writes
    `[Final Answer]: 42<|im_end|>`. Random weights never produce the marker, so without this
    every demo row would end as bad_format; with it the demo shows the whole path to `done`
    (extraction, export, scoring). Prompts are chat-templated through the model's own processor
    (from `out`, where the tokenizer and processor files are already written): table-like word
    soup, half of them with an image, so text, image and mix prompts all answer."""
    import random

    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(seed)
    rng = random.Random(seed)
    processor = AutoProcessor.from_pretrained(str(out))
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForImageTextToText.from_config(config)
    model.load_state_dict(state)
    model.train()
    words = " ".join(_corpus()).split()
    punctuation = ["|", "<td>", "</td>", "&", "\\\\", ",", '"', "{", "}", ":", "---", "\n"]
    target = processor.tokenizer(ANSWER + "<|im_end|>", add_special_tokens=False)["input_ids"]
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        text = " ".join(rng.choice(words) if rng.random() < 0.7 else rng.choice(punctuation) for _ in range(rng.randint(5, 1500)))
        content = [{"type": "text", "text": text}]
        images = None
        if step % 2:
            side = lambda: rng.randint(2, 48) * 32  # noqa: E731
            images = [_table_like_image(side(), side(), rng)]
            content.insert(0, {"type": "image"})
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[prompt], images=images, return_tensors="pt")
        ids = torch.cat([inputs["input_ids"], torch.tensor([target])], dim=1)
        labels = torch.full_like(ids, -100)
        labels[:, -len(target):] = ids[:, -len(target):]
        extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
        if "mm_token_type_ids" in inputs:  # transformers >= 5.2 wants it with images
            types = inputs["mm_token_type_ids"]
            extra["mm_token_type_ids"] = torch.cat([types, torch.zeros((1, len(target)), dtype=types.dtype)], dim=1)
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **extra).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
