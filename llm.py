"""The built-in ``llm.chat`` workflow: one call to an OpenAI-compatible
``POST {OPENAI_BASE_URL}/chat/completions``, paid for within the job's cap.

Before the call it works out the worst case, an upper bound of the
prompt's tokens plus ``max_tokens`` at the model's prices, and fails the job
with ``budget_exceeded`` without calling if that does not fit what the job
may still spend, or what today's budgets can hold for it. After the call it
charges the real cost from the answer's ``usage``, in full even if the API
billed past the worst case. Prices come from the operator's MODEL_PRICES
file; a model without a price is refused. LLM_LIMITS caps each model's
requests and tokens a minute across the service; a job over them, or told
to wait by the provider (429 with Retry-After), goes back to the queue for
that long without spending an attempt. Only the standard library's HTTP
client is used.
"""

import decimal
import email.utils
import json
import socket
import time
import urllib.error
import urllib.request

import jsonschema

import engine

DEFAULT_MAX_TOKENS = 1024


class TransientError(Exception):
    """A failure worth another attempt (429, 5xx, timeouts): the engine retries it."""


class AnswerLost(TransientError):
    """The request was sent and the answer is lost or unreadable: the
    provider may have billed it, so the worst case is charged."""


def load_prices(path):
    """{model: (input, output)} in dollars per million tokens, as Decimals."""
    with open(path) as f:
        raw = json.load(f)
    if not isinstance(raw, dict):
        raise ValueError("MODEL_PRICES must be a JSON object of models")
    prices = {}
    for model, price in raw.items():
        try:
            prices[model] = (decimal.Decimal(str(price["input"])), decimal.Decimal(str(price["output"])))
        except (TypeError, KeyError, decimal.InvalidOperation):
            raise ValueError(f"MODEL_PRICES: {model!r} needs numeric input and output prices") from None
        if min(prices[model]) < 0:
            raise ValueError(f"MODEL_PRICES: {model!r} has a negative price")
    return prices


def micro_cost(prices, prompt_tokens, completion_tokens):
    """Micro-dollars for the tokens: dollars per million tokens is exactly
    micro-dollars per token. Rounded up."""
    cost = prices[0] * prompt_tokens + prices[1] * completion_tokens
    return int(cost.to_integral_value(decimal.ROUND_CEILING))


def estimate_prompt_tokens(messages):
    """An upper bound, not a guess: a byte-level BPE token covers at least
    one byte of UTF-8, so a message has at most as many tokens as its role
    and content have bytes (every CJK character or emoji is at least one),
    plus the framing around each message and the reply."""
    size = sum(len(str(m.get("content", "")).encode("utf-8", "surrogatepass"))
               + len(str(m.get("role", "")).encode("utf-8", "surrogatepass")) for m in messages)
    return size + 8 * len(messages) + 16


def retry_after(value, now=None):
    """Seconds a Retry-After header asks for (seconds or an HTTP date), at
    most an hour; None if there is none or it cannot be read."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(3600.0, float(value))
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(3600.0, max(0.0, when - (time.time() if now is None else now)))


def load_limits(text):
    """LLM_LIMITS: {model: {"rpm": n, "tpm": n}}, each optional, whole and above 0."""
    raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError("must be a JSON object of models")
    for model, limits in raw.items():
        if not isinstance(limits, dict) or not set(limits) <= {"rpm", "tpm"} or not all(
                type(v) is int and v > 0 for v in limits.values()):
            raise ValueError(f"{model!r} needs rpm and/or tpm, whole numbers above 0")
    return raw


# Named statements, the same on SQLite and PostgreSQL: one row per model and
# minute. The update is the check: it adds only while both stay in bounds,
# so processes and hosts racing for the last request of a minute take it once.
LIMIT_SQL = {
    "minute": "INSERT INTO llm_minutes (model, minute, requests, tokens) VALUES (:model, :minute, 0, 0)"
              " ON CONFLICT (model, minute) DO NOTHING",
    "take": "UPDATE llm_minutes SET requests = requests + 1, tokens = tokens + :tokens"
            " WHERE model = :model AND minute = :minute AND requests < :rpm AND tokens + :tokens <= :tpm",
    "forget": "DELETE FROM llm_minutes WHERE minute < :before",
}
UNLIMITED = 2**62


class ProviderLimits:
    """Requests and tokens per minute per model (LLM_LIMITS), counted in the
    database every process and host shares, so they cap the whole service."""

    def __init__(self, db, limits, clock=time.time):
        self.db = db
        self.limits = limits
        self.clock = clock

    def take(self, model, tokens):
        """Count one request of up to ``tokens`` for ``model`` this minute;
        None if it fits, else the seconds until the next minute."""
        limits = self.limits.get(model)
        if not limits:
            return None
        if tokens > limits.get("tpm", UNLIMITED):
            raise engine.PermanentFailure(f"the request may use {tokens} tokens, more than "
                                          f"{model}'s {limits['tpm']} a minute (LLM_LIMITS)")
        now = self.clock()
        minute = int(now // 60)
        params = {"model": model, "minute": minute, "tokens": tokens,
                  "rpm": limits.get("rpm", UNLIMITED), "tpm": limits.get("tpm", UNLIMITED)}
        with self.db.write() as conn:
            conn.execute(LIMIT_SQL["minute"], params)
            taken = conn.execute(LIMIT_SQL["take"], params).rowcount == 1
            conn.execute(LIMIT_SQL["forget"], {"before": minute - 5})
        return None if taken else (minute + 1) * 60 - now


class Client:
    def __init__(self, base_url, api_key, prices, timeout=60):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.prices = prices
        self.timeout = timeout

    def complete(self, body):
        request = urllib.request.Request(
            self.base_url + "/chat/completions", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read(4 * 1024 * 1024))
        except urllib.error.HTTPError as exc:  # an answer with a status: nothing was billed
            wait = retry_after(exc.headers.get("Retry-After")) if exc.code == 429 else None
            if wait is not None:  # the provider's own rate limit: no fault of the job's
                raise engine.RetryLater(wait, f"the model API asked to wait {wait:g} s") from None
            if exc.code == 429 or exc.code >= 500:
                raise TransientError(f"the model API answered {exc.code}") from None
            raise engine.PermanentFailure(f"the model API refused the request: HTTP {exc.code}") from None
        except urllib.error.URLError as exc:  # urllib wraps failures to connect and send
            raise TransientError(f"the model API could not be reached: {exc.reason}") from None
        except (socket.timeout, TimeoutError, ConnectionError) as exc:
            raise AnswerLost(f"the model API's answer did not arrive: {exc}") from None
        except ValueError:
            raise AnswerLost("the model API answered something that is not JSON") from None
        if not isinstance(answer, dict):
            raise AnswerLost("the model API's answer is not a JSON object")
        return answer


def jsonschema_checked(payload):
    """``payload`` if it is what SCHEMA allows, else ValueError saying why."""
    error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(payload))
    if error is not None:
        raise ValueError(error.message[:200])
    return payload


SCHEMA = {
    "type": "object",
    "properties": {
        "model": {"type": "string", "minLength": 1, "maxLength": 200},
        "messages": {
            "type": "array", "minItems": 1, "maxItems": 500,
            # Only what the estimate counts: a field it does not see could be billed.
            "items": {"type": "object", "required": ["role", "content"],
                      "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
                      "additionalProperties": False},
        },
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 200_000},
    },
    "required": ["model", "messages"],
    "additionalProperties": False,
}


_VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


@engine.workflow("llm.chat", timeout=120, schema=SCHEMA)
def chat_workflow(payload, ctx):
    """The llm.chat workflow: one chat completion (see ``chat``)."""
    return chat(ctx, payload["model"], payload["messages"], payload.get("max_tokens"))


def chat(ctx, model, messages, max_tokens=None):
    """One chat completion for the job of ``ctx``, priced and charged to it
    (within its cost cap and today's budgets, LLM_LIMITS kept): the
    message, the tokens used and the cost. A workflow may call it itself;
    inside ``ctx.step`` its spend is that step's, and a replay never pays
    for it again:

        summary = ctx.step("summarise", llm.chat, ctx, "gpt-4o-mini", messages)
    """
    client = ctx.engine.llm
    if client is None:
        ctx.fail("llm.chat is not configured: set OPENAI_API_KEY and MODEL_PRICES")
    try:
        payload = jsonschema_checked({"model": model, "messages": messages,
                                      **({} if max_tokens is None else {"max_tokens": max_tokens})})
    except ValueError as exc:
        ctx.fail(f"llm.chat: {exc}")
    prices = client.prices.get(payload["model"])
    if prices is None:
        ctx.fail(f"model {payload['model']!r} has no price in MODEL_PRICES")
    max_tokens = payload.get("max_tokens", DEFAULT_MAX_TOKENS)
    worst = micro_cost(prices, estimate_prompt_tokens(payload["messages"]), max_tokens)
    left = ctx.budget_left()
    if worst > left:
        raise engine.BudgetFailure(f"the worst case, {worst / 1e6:.6f} dollars, does not fit the "
                                   f"{left / 1e6:.6f} dollars left of the job's cost cap")
    limits = ctx.engine.llm_limits
    if limits is not None:
        wait = limits.take(payload["model"], estimate_prompt_tokens(payload["messages"]) + max_tokens)
        if wait is not None:
            raise engine.RetryLater(wait, f"{payload['model']}: LLM_LIMITS reached this minute")
    ctx.reserve(worst)  # against today's budgets too, before any money is spent
    messages = [{"role": m["role"], "content": m["content"]} for m in payload["messages"]]
    try:
        answer = client.complete({"model": payload["model"], "messages": messages,
                                  "max_tokens": max_tokens})
    except AnswerLost:
        ctx.charge(decimal.Decimal(worst) / 1_000_000, f"{payload['model']}: answer lost, worst case")
        raise
    usage = answer.get("usage") or {}
    try:
        prompt, completion = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        if prompt < 0 or completion < 0:
            raise ValueError("negative usage")
        cost = micro_cost(prices, prompt, completion)
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError):
        prompt = completion = None
        cost = worst  # no usage reported: charge the worst case, never less
    ctx.charge(decimal.Decimal(cost) / 1_000_000, f"{payload['model']}: {prompt} + {completion} tokens")
    try:
        message = answer["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        raise TransientError("the model API's answer has no message") from None
    return {"message": message, "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
            "cost": round(cost / 1_000_000, 6)}
