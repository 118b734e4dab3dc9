#!/usr/bin/env python3
"""Checks that the official `openai` Python client (>= 1) accepts `blocktrain gateway`.

Usage: openai-client-check.py http://127.0.0.1:8000 [AR_URL]

Exercises completions (string and list prompts, n, stop, temperature 0 determinism,
seed, stream), chat completions (plain and streamed), models.list/retrieve and the
errors on an unknown model and on logprobs (a diffusion model has none). With AR_URL, a
gateway in front of an AR model: logprobs in completions and chat, plain and streamed,
read through the client's own types. Exits non-zero on the first failure; run by
crates/cli/tests/inference/gateway.rs when a python with `openai` is found.
"""
import sys

import openai


def main(base: str) -> None:
    client = openai.OpenAI(base_url=base.rstrip("/") + "/v1", api_key="unused", max_retries=0)
    checks = 0

    models = client.models.list().data
    assert len(models) == 1, models
    model = models[0].id
    assert client.models.retrieve(model).id == model
    try:
        client.models.retrieve("gpt-4")
        raise AssertionError("models.retrieve('gpt-4') succeeded")
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", e
    checks += 3

    def complete(**kw):
        kw.setdefault("model", model)
        kw.setdefault("prompt", "ROMEO: ")
        kw.setdefault("max_tokens", 16)
        return client.completions.create(**kw)

    # Greedy is deterministic without a seed; a seed makes sampling repeatable.
    a, b = complete(temperature=0), complete(temperature=0)
    assert a.choices[0].text == b.choices[0].text, (a, b)
    assert a.choices[0].finish_reason == "length"
    assert a.usage.completion_tokens == 16, a.usage
    s1, s2 = complete(temperature=0.9, seed=5), complete(temperature=0.9, seed=5)
    assert s1.choices[0].text == s2.choices[0].text
    greedy = a.choices[0].text
    checks += 2

    # A list prompt with n: prompt-major choices, each prompt's first choice is what a
    # single request with the same seed gives (greedy, which depends on the prompt even
    # for an untrained model).
    many = complete(prompt=["ROMEO: ", "JULIET: "], n=2, temperature=0, seed=9)
    assert [c.index for c in many.choices] == [0, 1, 2, 3], many.choices
    juliet = complete(prompt="JULIET: ", temperature=0, seed=9)
    assert many.choices[2].text == juliet.choices[0].text
    assert many.usage.completion_tokens == 4 * 16
    checks += 1

    # stop: the output ends before the first stop sequence.
    ascii_at = [i for i, ch in enumerate(greedy) if i > 0 and ch.isascii()]
    if ascii_at:
        stop = greedy[ascii_at[len(ascii_at) // 2]]
        cut = complete(temperature=0, stop=[stop])
        assert cut.choices[0].text == greedy[: greedy.index(stop)], (cut, greedy, stop)
        assert cut.choices[0].finish_reason == "stop"
        checks += 1
    else:
        print(f"note: stop not checked: the greedy output {greedy!r} has no ASCII char")

    # stream: the pieces make the same text; the last piece says why it ended.
    pieces = list(complete(temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == greedy
    assert pieces[-1].choices[0].finish_reason == "length"
    checks += 1

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    content = chat.choices[0].message.content
    assert isinstance(content, str)
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, stream=True
    )
    deltas = list(stream)
    assert all(d.object == "chat.completion.chunk" for d in deltas)
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == content
    assert deltas[-1].choices[0].finish_reason in ("stop", "length")
    checks += 2

    try:
        complete(model="gpt-4")
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", e
    try:
        complete(logprobs=1)
        raise AssertionError("logprobs were accepted")
    except openai.BadRequestError as e:
        assert "logprobs" in str(e) and "diffusion" in str(e), e
    checks += 2

    print(f"ok: {checks} checks with openai {openai.__version__}")


def check_ar(base: str) -> None:
    """logprobs from an AR model's gateway, as the client's types read them."""
    client = openai.OpenAI(base_url=base.rstrip("/") + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    checks = 0

    def complete(**kw):
        return client.completions.create(model=model, prompt="ROMEO: ", max_tokens=8, **kw)

    # Legacy completions: one token per byte; each top_logprobs entry holds the 2 most
    # likely and the sampled token; greedy samples the most likely.
    c = complete(temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8, lp
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and top[token] == value and len(top) == 2, (token, value, top)
        assert max(top.values()) == value, top
    assert lp.text_offset[0] == 0 and sorted(lp.text_offset) == lp.text_offset, lp.text_offset
    pieces = list(complete(temperature=0, logprobs=2, stream=True))
    streamed = [t for p in pieces if p.choices[0].logprobs for t in p.choices[0].logprobs.tokens]
    assert streamed == lp.tokens, (streamed, lp.tokens)
    checks += 2

    # Chat: logprobs.content, one entry per byte, top_logprobs most likely first.
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    for t in content:
        assert len(t.bytes) == 1 and len(t.top_logprobs) == 2, t
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob, t
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob, t
    text = bytes(b for t in content for b in t.bytes).decode("utf-8", "replace")
    assert text == chat.choices[0].message.content, (text, chat.choices[0].message.content)
    deltas = list(
        client.chat.completions.create(
            model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
            stream=True,
        )
    )
    joined = [t for d in deltas if d.choices and d.choices[0].logprobs for t in d.choices[0].logprobs.content]
    assert joined == content, (joined, content)
    checks += 2

    try:
        complete(logprobs=1, echo=True)
        raise AssertionError("echo with logprobs was accepted")
    except openai.BadRequestError as e:
        assert "echo" in str(e), e
    try:
        complete(logprobs=6)
        raise AssertionError("logprobs=6 was accepted")
    except openai.BadRequestError as e:
        assert "0..=5" in str(e), e
    checks += 2

    print(f"ok: {checks} AR logprobs checks with openai {openai.__version__}")


if __name__ == "__main__":
    main(sys.argv[1])
    if len(sys.argv) > 2:
        check_ar(sys.argv[2])
