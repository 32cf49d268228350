"""A real engine answers the OpenAI API as the official client expects.

The gateway and the operator's llama.cpp backends are only as good as the assumption
that an engine speaks this protocol; a real (tiny, random) model checks the shapes the
fakes imitate. The text is nonsense by design: assert on shapes, never on content.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import openai
import pytest

from tests.support.engine import (  # noqa: F401 (fixtures, found by name)
    LlamaServer,
    tiny_engine_fixture,
    tiny_gguf_fixture,
)

# The first test's setup may build the engine (~3 min on 2 busy cores): more than the
# suite's default 300 s timeout leaves room for.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
]


@pytest.fixture
def client(tiny_engine: LlamaServer) -> Iterator[openai.OpenAI]:
    assert tiny_engine.api_key is not None
    with openai.OpenAI(
        base_url=tiny_engine.base_url, api_key=tiny_engine.api_key, max_retries=0, timeout=60
    ) as c:
        yield c


def test_chat_completion_has_the_openai_shape(
    client: openai.OpenAI, tiny_engine: LlamaServer
) -> None:
    answer = client.chat.completions.create(
        model=tiny_engine.alias or "", messages=MESSAGES, max_tokens=8, temperature=0
    )
    assert answer.object == "chat.completion"
    assert answer.id
    assert answer.model == tiny_engine.alias
    assert len(answer.choices) == 1
    choice = answer.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content is None or isinstance(choice.message.content, str)
    assert choice.finish_reason in {"stop", "length"}
    assert answer.usage is not None
    assert answer.usage.prompt_tokens > 0
    # Not `<= max_tokens`: llama-cpp-python keeps sampling past the limit while the text
    # ends in an incomplete UTF-8 sequence, which a random byte-level model often emits.
    assert answer.usage.completion_tokens >= 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_streaming_chat_ends_normally(client: openai.OpenAI, tiny_engine: LlamaServer) -> None:
    with client.chat.completions.create(
        model=tiny_engine.alias or "", messages=MESSAGES, max_tokens=8, stream=True
    ) as stream:
        chunks = list(stream)  # the client stops at `data: [DONE]`
    assert chunks
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    choices = [c.choices[0] for c in chunks if c.choices]
    assert choices[0].delta.role == "assistant"
    assert all(ch.finish_reason is None for ch in choices[:-1])
    assert choices[-1].finish_reason in {"stop", "length"}
    assert all(ch.delta.content is None or isinstance(ch.delta.content, str) for ch in choices)


def test_a_request_without_the_key_is_refused(tiny_engine: LlamaServer) -> None:
    with (
        openai.OpenAI(base_url=tiny_engine.base_url, api_key="sk-wrong", max_retries=0) as c,
        pytest.raises(openai.AuthenticationError),
    ):
        c.chat.completions.create(model=tiny_engine.alias or "", messages=MESSAGES, max_tokens=1)

    bare = urllib.request.Request(f"{tiny_engine.base_url}/models")  # no Authorization at all
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(bare, timeout=10)
    assert refused.value.code == 401


def test_models_lists_the_alias(client: openai.OpenAI, tiny_engine: LlamaServer) -> None:
    models = client.models.list()
    assert tiny_engine.alias in [m.id for m in models.data]
    assert all(m.object == "model" for m in models.data)
