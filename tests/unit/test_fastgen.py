"""hitq.engine.fastgen against one-at-a-time model.generate on the tiny model (CPU): shared
prefixes (text and image), singletons, natural stops and forced lengths give the same tokens."""
from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from hitq.engine import fastgen, planner  # noqa: E402
from hitq.engine.base import GenerationSettings, ImageLimits  # noqa: E402
from hitq.engine.qwen3vl import TransformersEngine  # noqa: E402

LIMITS, GREEDY = ImageLimits(), GenerationSettings()
TABLE = "<table>" + "".join(f"<tr><td>r{i}</td><td>{i * 7}</td></tr>" for i in range(40)) + "</table>"
QUESTIONS = ["What is r3?", "Sum of all values?", "Which row is largest, and why is that so?", "Hi"]


@pytest.fixture(scope="module")
def engines(tiny_model, tmp_path_factory):
    picture = tmp_path_factory.mktemp("fastgen") / "table.png"
    Image.new("RGB", (200, 160), (30, 60, 90)).save(picture)
    fast = TransformersEngine(tiny_model, fast=True)
    slow = TransformersEngine(tiny_model, fast=False, load_weights=False)
    slow.model = fast.model
    return fast, slow, picture


def _messages(question, picture=None, table=TABLE):
    content = [{"type": "image", "image": str(picture)}] if picture else []
    return [{"role": "user", "content": content + [{"type": "text", "text": f"Task: answer.\n{table}\nQuestion: {question}"}]}]


def _requests(engine, picture):
    reqs = [(i, _messages(q), 12 + 5 * i, i % 2 == 0, "text") for i, q in enumerate(QUESTIONS)]
    reqs += [(10 + i, _messages(q, picture), 20, True, "image") for i, q in enumerate(QUESTIONS)]
    reqs += [(20, _messages("alone"), 30, False, None), (21, _messages("short", table="tiny"), 9, True, "single")]
    return [engine.prepare(k, m, LIMITS, n, stop, key) for k, m, n, stop, key in reqs]


def test_fast_path_equals_one_at_a_time_generate(engines):
    fast, slow, picture = engines
    batch = _requests(fast, picture)
    got = fast.generate(batch, GREEDY)
    want = [slow.generate([p], GREEDY)[0] for p in batch]
    assert [(o.key, o.text, o.output_tokens) for o in got] == [(o.key, o.text, o.output_tokens) for o in want]
    shared = {o.key: o.extra["shared_prefix"] for o in got}
    assert shared[0] > 0 and shared[10] > shared[0] and shared[20] == 0  # the image group shares its image too


def test_forced_lengths_equal_generate_with_min_new_tokens(engines):
    fast, slow, picture = engines
    batch = _requests(fast, picture)
    fast.force_lengths = {str(p.key): 5 + (i % 3) * 11 for i, p in enumerate(batch)}
    try:
        got = fast.generate(batch, GREEDY)
    finally:
        forced, fast.force_lengths = fast.force_lengths, {}
    with torch.inference_mode():
        for p, out in zip(batch, got):
            n = forced[str(p.key)]
            inputs = slow.collate([p])
            seq = fast.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, temperature=1.0,
                                      top_p=1.0, top_k=50, eos_token_id=slow.eos_ids, pad_token_id=slow.pad_id)
            ids = seq[0, inputs["input_ids"].shape[1]:].tolist()
            assert (out.output_tokens, out.text) == (n, slow.tokenizer.decode(ids, skip_special_tokens=True))


@pytest.mark.parametrize("budget, rows", [(1500, 64), (None, 2)])
def test_few_slots_refilled_as_rows_stop_give_the_same_tokens(engines, budget, rows):
    fast, slow, picture = engines
    batch = _requests(fast, picture)
    want = [(o.text, o.output_tokens) for o in fast.generate(batch, GREEDY)]
    fast.kv_budget_tokens, fast.max_batch_rows = budget, rows
    try:
        got = fast.generate(batch, GREEDY)
    finally:
        fast.kv_budget_tokens, fast.max_batch_rows = None, 64
    assert [(o.text, o.output_tokens) for o in got] == want
    assert max(o.extra["most_live"] for o in got) < len(batch)  # rows were admitted as others stopped


def test_admission_order_and_budget():
    class R:
        def __init__(self, cap, need):
            self.length, self.limit = need - cap, cap

    @dataclasses.dataclass
    class G:
        rows: list
        need: int
        split: int = 0

        def own(self, r):
            return r.length - self.split + r.limit

    def group(n, need, cap):
        return G([R(cap, need) for _ in range(n)], need)

    groups = [group(2, 1000, 512), group(1, 400, 2048), group(5, 3000, 512), group(3, 900, 2048)]
    parts = planner.split_large(groups, rows=4, positions=10_000)  # 4 rows at most; 3 x 3000 fit in 10,000
    assert [(len(g.rows), g.need) for g in parts] == [(2, 1000), (1, 400), (3, 3000), (2, 3000), (3, 900)]
    order = planner.admission_order(parts)
    assert [(len(g.rows), g.need) for g in order] == [(3, 900), (1, 400), (3, 3000), (2, 3000), (2, 1000)]
    budget = planner.Budget(bytes=10_000, kv_per_token=2, workspace_per_token=3, max_rows=4)
    assert budget.positions(1000) == 3500 and budget.positions(4000) == 0


def _flash_on_cpu(q, k, v, cu_q, starts, used, max_q, max_k, causal, scale):
    """What fastgen._flash computes (flash-attention varlen, seqused_k, bottom-right causal),
    sequence by sequence in float32, so the decode path's slot plan and merge run on a CPU."""
    out, lse = torch.zeros(q.shape), torch.zeros(q.shape[:2])
    for s in range(len(used)):
        qs, n, start = slice(int(cu_q[s]), int(cu_q[s + 1])), int(used[s]), int(starts[s])
        scores = torch.einsum("thd,nhd->htn", q[qs].float(), k[start : start + n].float()) * scale
        if causal:
            T = scores.shape[1]
            scores = scores.masked_fill(torch.arange(n)[None] > torch.arange(n - T, n)[:, None], float("-inf"))
        lse[qs] = torch.logsumexp(scores, -1).transpose(0, 1)
        out[qs] = torch.einsum("htn,nhd->thd", torch.softmax(scores, -1), v[start : start + n].float())
    return out, lse


def _slots_where(host, plan, max_k):
    starts, used, cu_pairs, pairs, _ = plan
    return fastgen.Where(None, host, (torch.tensor(starts), torch.tensor(used), torch.tensor(cu_pairs), torch.tensor(pairs), max_k))


@pytest.mark.parametrize("smallest", [1, 5, 1024])
def test_decode_slots_and_their_merge_equal_attention_row_by_row(monkeypatch, smallest):
    """The decode step's plan (every segment cut into equal pieces over a fixed number of
    sequences, each read once by every row that reads it, unused ones reading scratch) and its
    log-sum-exp merge back into rows, against sdpa over each row's prefix + own region."""
    torch.manual_seed(0)
    N, Hkv, G, D = 400, 2, 3, 8
    k, v = torch.randn(N, Hkv, D), torch.randn(N, Hkv, D)
    # rows 0-9 share a prefix (more rows than read one piece together), row 10 alone, row 11 on scratch
    host = [[(0, 120), (200 + 8 * i, 1 + i)] for i in range(10)] + [[(130, 33), (300, 40)], [(N - 1, 1), (N - 1, 1)]]
    plan = fastgen.slots(host, 48, scratch=N - 1, smallest=smallest)
    starts, used, cu_pairs, (owner, order, slot, index), size = plan
    assert len(used) == 48 and len(owner) == 48 and max(used) == min(size, 120)
    assert [owner[p] for p in order] == sorted(owner) and all(cu_pairs[slot[p]] + index[p] == p for p in range(48) if owner[p] < 12)
    covered = sorted((owner[p], x) for p in range(48) if owner[p] < len(host)
                     for x in range(starts[slot[p]], starts[slot[p]] + used[slot[p]]))
    assert covered == sorted((r, x) for r, row in enumerate(host) for start, n in row for x in range(start, start + n))
    prefix_reads = [cu_pairs[s + 1] - cu_pairs[s] for s in range(48) if 0 <= starts[s] < 120 and cu_pairs[s + 1] > cu_pairs[s]]
    assert sorted(set(prefix_reads)) == [2, fastgen.ROWS_PER_READ]  # 10 rows: one read for 8 of them, one for 2
    q = torch.randn(len(host), Hkv * G, 1, D)
    monkeypatch.setattr(fastgen, "_efficient", lambda q, k, v, cu_q, starts, used, max_q, max_k, scale, lse_at:
                        _flash_on_cpu(q, k, v, cu_q, starts, used, max_q, max_k, False, scale))
    got = fastgen._attend_decode(q, k, v, _slots_where(host, plan, 120), D**-0.5)
    assert torch.allclose(got, fastgen._attend_reference(q, k, v, fastgen.Where(None, host), D**-0.5), atol=1e-5)
    with pytest.raises(ValueError, match="segment reads for 4 slots"):
        fastgen.slots(host, 4, scratch=N - 1)


def test_an_idle_decode_row_reads_nothing_and_unused_slots_get_no_queries(monkeypatch):
    """Decoder._load gives an idle decode position no segments: it gets no pair and a zero
    attention output (not 0/0), the busy rows are unchanged, and the unused slots, which come
    last, get no queries (so their thread blocks return at once)."""
    torch.manual_seed(2)
    N, Hkv, G, D = 400, 2, 3, 8
    k, v = torch.randn(N, Hkv, D), torch.randn(N, Hkv, D)
    busy = [[(0, 120), (200, 7)], [(130, 33), (250, 40)]]
    plan = fastgen.slots(busy[:1] + [[]] + busy[1:], 16, scratch=N - 1, smallest=16)
    starts, used, cu_pairs, (owner, *_), _ = plan
    assert 1 not in owner and owner[-1] == 3
    calls = []

    def efficient(q, k, v, cu_q, starts, used, max_q, max_k, scale, lse_at):
        calls.append(cu_q)
        return _flash_on_cpu(q, k, v, cu_q, starts, used, max_q, max_k, False, scale)

    monkeypatch.setattr(fastgen, "_efficient", efficient)
    q = torch.randn(3, Hkv * G, 1, D)
    got = fastgen._attend_decode(q, k, v, _slots_where(busy[:1] + [[(N - 1, 1), (N - 1, 1)]] + busy[1:], plan, 120), D**-0.5)
    want = fastgen._attend_reference(q[[0, 2]], k, v, fastgen.Where(None, busy), D**-0.5)
    assert torch.allclose(got[[0, 2]], want, atol=1e-5) and torch.equal(got[1], torch.zeros_like(got[1]))
    used_pairs = sum(o < 3 for o in owner)
    assert calls[0].tolist() == [G * c for c in cu_pairs] and cu_pairs[-1] == used_pairs and cu_pairs[-2] == used_pairs


def test_suffix_attention_merges_prefix_and_causal_own_region(monkeypatch):
    torch.manual_seed(1)
    N, H, T, D = 300, 4, 5, 8
    k, v = torch.randn(N, 2, D), torch.randn(N, 2, D)
    where = fastgen.Where(None, [[(0, 100), (150, T)], [(100, 30), (200, T)]])
    q = torch.randn(2, H, T, D)
    monkeypatch.setattr(fastgen, "_flash", lambda q, k, v, *a: _flash_on_cpu(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), *a))
    got = fastgen._attend_suffix(q, k, v, where, D**-0.5)
    assert torch.allclose(got, fastgen._attend_reference(q, k, v, where, D**-0.5), atol=1e-5)


def test_out_of_memory_in_the_fast_path_or_a_stream_is_engine_oom(engines, monkeypatch):
    from hitq.errors import EngineOOM

    fast, _, picture = engines

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(fastgen, "run", no_memory)
    batch = _requests(fast, picture)[:2]
    with pytest.raises(EngineOOM, match=r"out of memory on cpu: batch of 2, .*: OutOfMemoryError: CUDA out of memory"):
        fast.generate(batch, GREEDY)
    with pytest.raises(EngineOOM, match="out of memory on cpu: in a stream: OutOfMemoryError: CUDA out of memory"):
        fast.stream(lambda idle: None, lambda p, out: None, 1000, images=False)


def test_a_stream_stops_starting_requests_and_gives_the_waiting_ones_back(engines, monkeypatch):
    fast, slow, picture = engines
    batch = _requests(fast, picture)[:4]
    monkeypatch.setattr(fast, "max_batch_rows", 1)  # one request decodes at a time
    fed, done = [batch], []
    given_back = fast.stream(lambda idle: fed.pop() if fed else None, lambda p, out: done.append((p.key, out.text)),
                             1000, images=True, stopping=lambda: bool(done))
    assert len(done) == 1 and sorted(p.key for p in given_back) == sorted(p.key for p in batch if p.key != done[0][0])
    assert done[0][1] == slow.generate([next(p for p in batch if p.key == done[0][0])], GREEDY)[0].text


def test_prefill_chunks_beside_decode_steps_give_the_same_tokens(engines):
    """prefill_chunk: a text prefix admitted while rows are live is prefilled 16 tokens at a time,
    each chunk in one forward with a decode step; the tokens are model.generate's."""
    fast, slow, picture = engines
    batch = _requests(fast, picture)
    want = [(o.text, o.output_tokens) for o in (slow.generate([p], GREEDY)[0] for p in batch)]
    fast.prefill_chunk, fast.max_batch_rows = 16, 3
    try:
        got = fast.generate(batch, GREEDY)
    finally:
        fast.prefill_chunk, fast.max_batch_rows = None, 64
    assert [(o.text, o.output_tokens) for o in got] == want
    assert max(o.extra["mixed_steps"] for o in got) >= 2  # a first and a later chunk ran beside decode steps


class _Alone(fastgen.Batch):
    def shared(self) -> bool:
        return False


def _run_paced(fast, batch, share, source=fastgen.Batch):
    """fastgen.run over the batch (each row forced to its limit); returns the rows."""
    rows = [fastgen.Row(p, 30 if p.key == 20 else 3, forced=True) for p in batch]
    stopper = fastgen.Stopper(fast.tokenizer, fast.eos_ids, lambda text: False)
    with torch.inference_mode():
        figures = fastgen.run(fast.model, source(fastgen.make_groups(rows, fast.image_token_id)), 4000, 8, stopper,
                              fast.eos_ids, fast.device, fastgen.cache_kwarg(fast.model), lambda: None, False, decode_share=share)
    return rows, figures


def test_a_paced_long_answer_decodes_beside_the_prefills_with_the_same_tokens(engines, monkeypatch):
    """decode_share: while a long answer is live, the next group waits until the decode steps have
    had their share of the time; without it every group is admitted first and the long answer's
    steps trail after the last prefill. The tokens are the same either way. A source that no
    other worker shares is not paced."""
    fast, slow, picture = engines
    monkeypatch.setattr(fastgen, "LONG_ANSWER", 16)  # the 30-token answer of request 20 is long
    batch = [p for p in _requests(fast, picture) if p.prefix_key != "image"]
    (plain, plain_figures), (paced, paced_figures) = (_run_paced(fast, batch, share) for share in (0.0, 10.0))
    assert [r.ids for r in paced] == [r.ids for r in plain]
    alone, alone_figures = _run_paced(fast, batch, 10.0, _Alone)
    assert [r.ids for r in alone] == [r.ids for r in plain] and alone_figures["tail_steps"] == 29

    def long_done_before_last_admission(rows):
        long = next(r for r in rows if r.limit == 30)
        return long.timing["admitted"] + long.timing["seconds"] < max(r.timing["admitted"] for r in rows)

    assert not long_done_before_last_admission(plain) and plain_figures["steps"] == 29  # its first token is the prefill's
    assert long_done_before_last_admission(paced)
    assert plain_figures["tail_steps"] == 29 and paced_figures["tail_steps"] < 29  # steps after the last prefill


def test_a_stream_reports_every_request_as_it_stops_waiting(engines, monkeypatch):
    """started() hears of each request once: when its prefill begins, or when it is refused as
    larger than the arena (the worker's feeder counts the jobs still waiting by it)."""
    fast, slow, picture = engines
    batch = [p for p in _requests(fast, picture) if p.prefix_key in ("single", None)]
    monkeypatch.setattr(fast, "kv_budget_tokens", 60)  # the short request fits, the longer one does not
    fed, done, started = [batch], {}, []
    fast.stream(lambda idle: fed.pop() if fed else None, lambda p, out: done.update({p.key: out}), 1000, images=False,
                started=lambda requests: started.extend(p.key for p in requests))
    assert sorted(started) == sorted(done) == sorted(p.key for p in batch)
    assert [type(done[k]).__name__ for k in (20, 21)] == ["EngineOOM", "Output"]
