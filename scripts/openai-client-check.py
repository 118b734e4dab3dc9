#!/usr/bin/env python3
"""Checks that the official `openai` Python client (>= 1) accepts `blocktrain gateway`.

Usage: openai-client-check.py http://127.0.0.1:8000

Exercises completions (string and list prompts, n, stop, temperature 0 determinism,
seed, stream), chat completions (plain and streamed), models.list/retrieve and the
errors on an unknown model and on logprobs. Exits non-zero on the first failure; run by
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
        assert "logprobs" in str(e), e
    checks += 2

    print(f"ok: {checks} checks with openai {openai.__version__}")


if __name__ == "__main__":
    main(sys.argv[1])
