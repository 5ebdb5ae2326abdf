"""Attacks on the money rules: spend the ledger never saw, concurrent cost
reports and retries, caps that restart, one tenant taking the whole day,
and budgets that refuse for too long or too soon."""

import http.server
import json
import threading

import pytest

from support import KEY, Client, make_app

DAY = 86_400


def money_app(tmp_path, clock=None, registry=None, **env):
    env.setdefault("RATE_BURST", 10_000)
    env.setdefault("RATE_GLOBAL", 10_000)
    app = make_app(tmp_path, registry=registry, API_KEYS=KEY, **env)
    if clock is not None:
        app.services.engine.now = clock
        app.services.ledger.clock = app.services.guardrails.clock = clock
        app.services.jobs.clock = clock
    return app


def intake(c, key=KEY, workflow="ext", **body):
    return c.post("/api/v1/intake", {"workflow": workflow, "payload": {}, **body}, key=key)


def claim(c, workflow="ext"):
    return c.post("/api/v1/jobs/claim", {"workflows": [workflow]}, key=KEY).json()["job"]


def reserved(app, job_id):
    rows = app.services.db.query("SELECT reserved FROM ledger_jobs WHERE job_id = ?", (job_id,))
    return rows[0]["reserved"] if rows else 0


def at_once(n, call):
    """Run call(i) on n threads released together; their results in order."""
    barrier = threading.Barrier(n)
    results = [None] * n

    def run(i):
        barrier.wait(10)
        results[i] = call(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


# -- a provider that bills by the character ---------------------------------------------


class BillingOpenAI:
    """An OpenAI-compatible /chat/completions on 127.0.0.1 that bills one
    prompt token per character of each message's role and content, and
    ``completion(max_tokens)`` completion tokens. ``seen`` is called as each
    request arrives (to look at the ledger while the call is under way)."""

    def __init__(self, completion=lambda max_tokens: max_tokens, seen=None):
        self.requests = []
        self.billed = []  # (prompt, completion) tokens per answer
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                if seen is not None:
                    seen(body)
                prompt = sum(len(m["role"]) + len(m["content"]) for m in body["messages"])
                usage = (prompt, completion(body["max_tokens"]))
                fake.billed.append(usage)
                data = json.dumps({
                    "choices": [{"message": {"role": "assistant", "content": "ok"}}],
                    "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def env(self, tmp_path):
        prices = tmp_path / "prices.json"
        # $100 per million tokens: exactly 100 micro-dollars a token, either way.
        prices.write_text(json.dumps({"big-model": {"input": 100, "output": 100}}))
        return {"OPENAI_BASE_URL": self.url, "OPENAI_API_KEY": "sk-test", "MODEL_PRICES": str(prices)}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def chat(c, content, max_tokens=200, **body):
    payload = {"model": "big-model", "max_tokens": max_tokens,
               "messages": [{"role": "user", "content": content}]}
    return c.post("/api/v1/intake", {"workflow": "llm.chat", "payload": payload, **body}, key=KEY)


@pytest.mark.parametrize("content, called", [
    ("字" * 4000, False),       # 4,204 tokens billed: $0.42 against a $0.35 cap
    ("😀" * 3500, False),       # 3,704 tokens: $0.37
    ("é" * 3400 + "字" * 200, False),
    ("字" * 900, True),         # 2,700 bytes: the worst case fits, the call costs $0.11
    ("hello " * 500, True),
])
def test_llm_chat_never_calls_when_a_cjk_or_emoji_prompt_could_pass_the_cap(tmp_path, content, called):
    fake = BillingOpenAI()
    app = money_app(tmp_path, **fake.env(tmp_path))
    try:
        c = Client(app)
        job_id = chat(c, content, max_cost=0.35).json()["job_id"]
        app.services.engine.run_next()
        view = c.get(f"/api/v1/status/{job_id}").json()
        assert bool(fake.requests) == called
        if called:
            (prompt, completion), = fake.billed
            billed = 100 * (prompt + completion)
            assert billed <= 350_000 and view["status"] == "succeeded", view
            assert app.services.ledger.spent(job_id) == billed
        else:
            assert view["status"] == "failed" and view["error"]["type"] == "budget_exceeded"
            assert view["cost"]["spent"] == 0
    finally:
        app.stop()
        fake.close()


def test_llm_chat_refuses_message_fields_the_estimate_cannot_see(tmp_path):
    app = money_app(tmp_path)
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi", "name": "x" * 10_000}]}
    r = Client(app).post("/api/v1/intake", {"workflow": "llm.chat", "payload": payload}, key=KEY)
    assert r.status == 400 and r.json()["error"] == "validation_failed"
    app.stop()
