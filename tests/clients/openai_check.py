#!/usr/bin/env python3
"""Drive an OpenAI-compatible server with the official `openai` Python package.

Usage: target/clients-venv/bin/python tests/clients/openai_check.py BASE_URL

BASE_URL is the server root (e.g. http://127.0.0.1:8080); "/v1" is appended.
Environment:
  TOFY_API_KEY    bearer token to send (default "none")
  CHECK_MODEL_ID  id that /v1/models must list (default "tofy"); requests
                  always name model "tofy" (llama-server accepts any name)
  CHECK_BAD_REQUESTS  comma list of malformed chat requests that must give
                  HTTP 400 (default "empty-messages"; see BAD_REQUESTS)

Prints "ok: N checks" and exits 0, or prints the failing check and exits 1.
"""

import os
import sys
import traceback

import openai
from openai import OpenAI

MODEL = "tofy"


class CheckFailed(Exception):
    pass


class Checker:
    def __init__(self):
        self.count = 0
        self.current = "setup"

    def check(self, cond, msg):
        self.count += 1
        if not cond:
            raise CheckFailed(f"[{self.current}] {msg}")


def check_models(c, client):
    c.current = "models.list"
    want = os.environ.get("CHECK_MODEL_ID", "tofy")
    ids = [m.id for m in client.models.list()]
    c.check(len(ids) > 0, "models.list() returned no models")
    c.check(want in ids, f"model id {want!r} not in models.list(): {ids!r}")


def check_chat(c, client):
    c.current = "chat non-stream"
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello in one short sentence."}],
        max_tokens=16,
        temperature=0,
    )
    c.check(len(r.choices) == 1, f"expected 1 choice, got {len(r.choices)}")
    ch = r.choices[0]
    c.check(ch.message.role == "assistant", f"message.role is {ch.message.role!r}")
    c.check(bool(ch.message.content and ch.message.content.strip()),
            f"empty message.content: {ch.message.content!r}")
    c.check(ch.finish_reason in ("stop", "length"),
            f"finish_reason {ch.finish_reason!r} not in {{stop, length}}")
    c.check(r.usage is not None, "usage missing")
    c.check(r.usage.prompt_tokens > 0, f"usage.prompt_tokens={r.usage.prompt_tokens}")
    c.check(0 < r.usage.completion_tokens <= 16,
            f"usage.completion_tokens={r.usage.completion_tokens} not in 1..=16")


def check_chat_stream(c, client):
    c.current = "chat stream"
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    c.check(len(chunks) >= 2, f"only {len(chunks)} chunks")
    with_choices = [ch for ch in chunks if ch.choices]
    c.check(len(with_choices) > 0, "no chunk has choices")
    first = with_choices[0].choices[0]
    c.check(first.delta.role == "assistant",
            f"first chunk delta.role is {first.delta.role!r}, want 'assistant'")
    text = "".join(ch.choices[0].delta.content or "" for ch in with_choices)
    c.check(text.strip() != "", "concatenated delta.content is empty")
    finishes = [ch.choices[0].finish_reason for ch in with_choices
                if ch.choices[0].finish_reason is not None]
    c.check(len(finishes) == 1,
            f"expected exactly one chunk with finish_reason, got {finishes!r}")
    c.check(finishes[0] in ("stop", "length"), f"finish_reason {finishes[0]!r}")
    last = chunks[-1]
    c.check(last.choices == [], f"last chunk has choices: {last.choices!r}")
    c.check(last.usage is not None, "last chunk has no usage (stream_options.include_usage)")
    c.check(last.usage.prompt_tokens > 0, f"stream usage.prompt_tokens={last.usage.prompt_tokens}")
    c.check(0 < last.usage.completion_tokens <= 16,
            f"stream usage.completion_tokens={last.usage.completion_tokens} not in 1..=16")
    usage_chunks = [ch for ch in chunks if ch.usage is not None]
    c.check(len(usage_chunks) == 1, f"expected one usage chunk, got {len(usage_chunks)}")
    ids = {ch.id for ch in chunks}
    c.check(len(ids) == 1, f"chunks carry different ids: {ids!r}")


def check_completions(c, client):
    c.current = "completions non-stream"
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
    )
    c.check(len(r.choices) == 1, f"expected 1 choice, got {len(r.choices)}")
    c.check(bool(r.choices[0].text and r.choices[0].text.strip()),
            f"empty text: {r.choices[0].text!r}")
    c.check(r.choices[0].finish_reason in ("stop", "length"),
            f"finish_reason {r.choices[0].finish_reason!r}")
    c.check(r.usage is not None and 0 < r.usage.completion_tokens <= 8,
            f"usage {r.usage!r}")

    c.current = "completions stream"
    stream = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].text or "" for ch in chunks if ch.choices)
    c.check(text.strip() != "", f"concatenated stream text is empty ({len(chunks)} chunks)")
    finishes = [ch.choices[0].finish_reason for ch in chunks
                if ch.choices and ch.choices[0].finish_reason is not None]
    c.check(len(finishes) == 1, f"expected one finish_reason, got {finishes!r}")


BAD_REQUESTS = {
    # The OpenAI API rejects an empty message list; tofy must too.
    # Not rejected by llama-server, which then renders an empty chat.
    "empty-messages": dict(messages=[]),
    "n2": dict(messages=[{"role": "user", "content": "hi"}], n=2),
    "negative-max-tokens": dict(messages=[{"role": "user", "content": "hi"}], max_tokens=-5),
}


def check_bad_request(c, client):
    # CHECK_BAD_REQUESTS picks which malformed requests must give HTTP 400
    # (comma list of BAD_REQUESTS keys). llama-server answers messages=[]
    # with a completion and accepts n up to its slot count (-np), so drive it
    # with CHECK_BAD_REQUESTS=negative-max-tokens.
    names = os.environ.get("CHECK_BAD_REQUESTS", "empty-messages").split(",")
    for name in (n.strip() for n in names if n.strip()):
        c.current = f"bad request {name}"
        if name not in BAD_REQUESTS:
            raise CheckFailed(f"[{c.current}] unknown CHECK_BAD_REQUESTS entry")
        kwargs = dict(BAD_REQUESTS[name])
        kwargs.setdefault("max_tokens", 4)
        try:
            client.chat.completions.create(model=MODEL, **kwargs)
        except openai.BadRequestError as e:
            c.check(e.status_code == 400, f"status {e.status_code}, want 400")
            continue
        except openai.APIStatusError as e:
            c.check(False, f"gave HTTP {e.status_code}, want 400 ({e})")
        c.check(False, "request was accepted, want HTTP 400")


def main():
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    base = sys.argv[1].rstrip("/")
    client = OpenAI(
        base_url=base + "/v1",
        api_key=os.environ.get("TOFY_API_KEY", "none"),
        timeout=120,
        max_retries=0,
    )
    c = Checker()
    try:
        for step in (check_models, check_chat, check_chat_stream,
                     check_completions, check_bad_request):
            step(c, client)
    except CheckFailed as e:
        print(f"FAIL {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - any client error fails the current check
        if not isinstance(e, openai.APIError):
            traceback.print_exc()
        print(f"FAIL [{c.current}] {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"ok: {c.count} checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
