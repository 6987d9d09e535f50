"""hitq.engine.splitkv, the decode step's Triton attention kernel, run by Triton's interpreter on
the CPU inside fastgen's decode attention, against sdpa row by row."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# TRITON_INTERPRET is read when the kernel is defined, so the check runs in its own interpreter.
# On a GPU, tests/gpu checks the compiled kernel in bf16 against the same reference.
CHECK = r"""
import json, torch
from hitq.engine import fastgen, splitkv
splitkv.usable = lambda device, head_dim, max_q: True  # CPU tensors: the interpreter runs the kernel
torch.manual_seed(0)
N, Hkv, G, D = 400, 2, 4, 16
k, v = torch.randn(N, Hkv, D), torch.randn(N, Hkv, D)
# rows 0-9 share a prefix (more rows than read one piece together), row 10 alone, row 11 idle
busy = [[(0, 120), (200 + 8 * i, 1 + i)] for i in range(10)] + [[(130, 33), (300, 40)]]
starts, used, cu_pairs, pairs, _ = fastgen.slots(busy + [[]], 48, scratch=N - 1, smallest=16)
plan = tuple(torch.tensor(x, dtype=torch.int32) for x in (starts, used, cu_pairs)) + (torch.tensor(pairs), 120)
q = torch.randn(12, Hkv * G, 1, D)
host = busy + [[(N - 1, 1), (N - 1, 1)]]
got = fastgen._attend_decode(q, k, v, fastgen.Where(None, host, plan), D**-0.5)
want = fastgen._attend_reference(q[:11], k, v, fastgen.Where(None, busy), D**-0.5)
print(json.dumps({"max_abs": float((got[:11] - want).abs().max()), "idle_zero": bool((got[11] == 0).all()),
                  "unused_slots": sum(a == b for a, b in zip(cu_pairs, cu_pairs[1:]))}))
"""


def test_the_triton_decode_kernel_equals_attention_row_by_row():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["max_abs"] < 1e-5 and result["idle_zero"] and result["unused_slots"] > 0, result
