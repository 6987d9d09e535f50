"""Judge client against a stub OpenAI-compatible server on 127.0.0.1."""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from hitq.evaluation.judge import Judge, fill, parse_score
from hitq.evaluation.scoring import score_rows


@pytest.fixture
def stub():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"body": body, "auth": self.headers.get("Authorization")})
            reply = {"choices": [{"message": {"content": "Reasoning...\n[Score]: 73/100"}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1", seen
    server.shutdown()


def _row(sub):
    return {"id": 1, "FileName": "t", "QuestionType": "Data Analysis", "SubQType": sub, "Question": "Q?",
            "Reference": "ref {table}", "Prediction": "pred", "status": "done"}


def test_judge_scores_summary_rows_and_sends_key_only_as_header(stub, monkeypatch):
    url, seen = stub
    monkeypatch.setenv("HITQ_JUDGE_API_KEY", "sk-secret")
    judge = Judge(url, "judge-model", {"Summary Analysis": "Q={question} R={reference_answer} U={user_answer}"})
    assert "sk-secret" not in repr(judge)
    scores = score_rows([_row("Summary Analysis"), {**_row("Exploratory Analysis"), "id": 2}], judge=judge)
    assert scores[1]["Judge"] == 73.0 and scores[1]["judge_raw"].endswith("73/100")
    assert "Judge" not in scores[2]
    assert len(seen) == 1 and seen[0]["auth"] == "Bearer sk-secret"
    assert seen[0]["body"]["temperature"] == 0
    assert seen[0]["body"]["messages"][0]["content"] == "Q=Q? R=ref {table} U=pred"  # one-pass fill


def test_judge_failure_keeps_the_row_unscored(monkeypatch):
    judge = Judge("http://127.0.0.1:9/v1", "m", {"Anomaly Analysis": "{question}"}, timeout_s=2)
    result = judge(_row("Anomaly Analysis"))
    assert result["Judge"] is None and result["judge_error"]


def test_parse_and_fill():
    assert parse_score("[Score]: 85/100") == 85.0
    assert parse_score("Score: 40 / 100 then [Score]: 90") == 90.0
    assert parse_score("no number") is None
    assert fill("{table}|{question}", {"table": "{question}", "question": "q"}) == "{question}|q"
