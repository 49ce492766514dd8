"""Issue 3, prompt side: chat_template (sandboxed), its args and documents, generation
prompt, special tokens, echo, truncation, and the context_only / generation_only split.

Everything runs through ChatEndpoint over data/embedded_model (tiny Llama with the
32k Mistral SentencePiece tokenizer and its chat template).
"""

from __future__ import annotations

import pytest
from fastapi import HTTPException

from tests.chat_harness import USER, body, call, content, make_service, streamed_content

CONVERSATION = [
    {"role": "user", "content": "Finish my sentence."},
    {"role": "assistant", "content": "Once upon a time"},
]


@pytest.fixture(scope="module")
def service():
    svc = make_service()
    yield svc
    svc.frontend.engine.shutdown()


def prompt_ids(service, **fields) -> list[int]:
    return service.prepare(body(**fields)).generation.prompt_ids


def prompt_text(service, **fields) -> str:
    return service.frontend.tokenizer.decode(prompt_ids(service, **fields))


def refused(service, request: dict) -> dict:
    with pytest.raises(HTTPException) as raised:
        call(service, request)
    assert raised.value.status_code == 400
    return raised.value.detail


# -- chat templates ----------------------------------------------------------------


def test_a_requests_own_chat_template_renders_the_prompt(service):
    template = "{% for m in messages %}<<{{ m.role }}: {{ m.content }}>>{% endfor %}"
    out = call(service, body(chat_template=template, max_tokens=2))
    expected = service.frontend.tokenizer.encode(
        "<<user: Tell me a story.>>", add_special_tokens=False
    )
    assert out["usage"]["prompt_tokens"] == len(expected)
    assert prompt_ids(service, chat_template=template) == expected


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",  # the sandbox alone would render this as nothing
        "{{ messages|attr('__class__') }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ messages['__class__'] }}",
    ],
)
def test_a_template_reaching_outside_the_sandbox_is_a_400(service, template):
    detail = refused(service, body(chat_template=template))
    assert detail["param"] == "chat_template" and detail["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "template",
    [
        "{% if %}",
        "{{ raise_exception('no system messages') }}",
        "{{ messages[7].content }}",
        "{% for i in range(10**7) %}{% endfor %}",
        "{{ 1 / 0 }}",
    ],
)
def test_a_template_that_fails_is_a_400(service, template):
    detail = refused(service, body(chat_template=template))
    assert detail["param"] == "chat_template"
    assert "chat template" in detail["message"] or "chat_template" in detail["message"]


def test_chat_template_args_and_documents_reach_the_template(service):
    template = (
        "{% if enable_thinking %}<think>{% endif %}"
        "{% for d in documents or [] %}[{{ d.title }}: {{ d.text }}]{% endfor %}"
        "{{ messages[-1].content }}"
    )
    plain = prompt_text(service, chat_template=template)
    thinking = prompt_text(
        service, chat_template=template, chat_template_args={"enable_thinking": True}
    )
    assert "<think>" in thinking and "<think>" not in plain
    documents = [{"title": "Moon", "text": "The moon is far."}]
    with_docs = prompt_text(service, documents=documents)  # the model's own template
    assert "The moon is far." in with_docs and "The moon is far." not in prompt_text(service)
    detail = refused(service, body(chat_template_args={"tokenize": True}))
    assert detail["param"] == "chat_template_args"


def test_add_generation_prompt_and_add_special_tokens(service):
    base = prompt_ids(service)
    without = prompt_ids(service, add_generation_prompt=False)
    assert base[-1] == service.frontend.tokenizer.convert_tokens_to_ids("[/INST]")
    assert without == base[:-1]
    doubled = prompt_ids(service, add_special_tokens=True)
    assert doubled == [service.frontend.tokenizer.bos_token_id, *base]
    usage = call(service, body(add_special_tokens=True, max_tokens=1))["usage"]
    assert usage["prompt_tokens"] == len(base) + 1


# -- echo and truncation -------------------------------------------------------------


def test_echo_continues_the_final_assistant_message_and_prefixes_it(service):
    request = body(messages=CONVERSATION, max_tokens=6, ignore_eos=True)
    plain = call(service, request)
    echoed = call(service, {**request, "echo": True})
    assert content(echoed).startswith("Once upon a time")
    # The prompt ends inside the assistant message: no end-of-turn token.
    rendered = service.frontend.tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False, continue_final_message=True
    )
    continued = service.frontend.tokenizer.encode(rendered, add_special_tokens=False)
    assert echoed["usage"]["prompt_tokens"] == len(continued)
    assert plain["usage"]["prompt_tokens"] == len(continued) + 1  # the closing </s>
    assert echoed["usage"]["completion_tokens"] == 6
    events = call(service, {**request, "echo": True, "stream": True})
    assert streamed_content(events) == content(echoed)
    assert events[0]["choices"][0]["delta"]["content"] == "Once upon a time"
    # Echo only applies to a final assistant message.
    assert content(call(service, body(echo=True, max_tokens=3))) == content(
        call(service, body(max_tokens=3))
    )


def test_truncate_prompt_tokens_keeps_the_last_n(service):
    full = prompt_ids(service)
    kept = prompt_ids(service, truncate_prompt_tokens=4)
    assert kept == full[-4:]
    out = call(service, body(truncate_prompt_tokens=4, max_tokens=2))
    assert out["usage"]["prompt_tokens"] == 4
    longer = call(service, body(truncate_prompt_tokens=1000, max_tokens=2))
    assert longer["usage"]["prompt_tokens"] == len(full)


# -- disaggregated serving ------------------------------------------------------------


def test_context_only_then_generation_only_equals_one_request(service):
    request = body(max_tokens=12, presence_penalty=1.0, ignore_eos=True, logprobs=True)
    whole = call(service, request)
    context = call(service, {**request, "disaggregated_params": {"request_type": "context_only"}})
    handle = context["disaggregated_params"]
    assert handle["request_type"] == "context_only"
    assert isinstance(handle["ctx_request_id"], int) and handle["opaque_state"]
    assert len(handle["first_gen_tokens"]) == 1
    assert context["usage"]["completion_tokens"] == 1
    resume = {
        "request_type": "generation_only",
        "ctx_request_id": handle["ctx_request_id"],
        "opaque_state": handle["opaque_state"],
        "first_gen_tokens": handle["first_gen_tokens"],
    }
    generated = call(service, {**request, "disaggregated_params": resume})
    assert content(generated) == content(whole)
    assert generated["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    assert generated["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    tokens = [e["token"] for e in generated["choices"][0]["logprobs"]["content"]]
    assert tokens == [e["token"] for e in whole["choices"][0]["logprobs"]["content"]]
    # A handle works once.
    detail = refused(service, {**request, "disaggregated_params": resume})
    assert detail["param"] == "disaggregated_params"
    assert service.frontend.engine.engine.block_manager.num_used_blocks == 0


def test_seeded_sampling_survives_the_split(service):
    request = body(temperature=1.0, seed=77, max_tokens=10, ignore_eos=True)
    whole = content(call(service, request))
    context = call(service, {**request, "disaggregated_params": {"request_type": "context_only"}})
    handle = context["disaggregated_params"]
    resume = {
        "request_type": "generation_only",
        "ctx_request_id": handle["ctx_request_id"],
        "opaque_state": handle["opaque_state"],
    }
    assert context["choices"][0]["logprobs"] is None  # kept for later, not shown
    generated = call(
        service, {**request, "disaggregated_params": resume, "logprobs": True, "top_logprobs": 2}
    )
    assert content(generated) == whole
    entries = generated["choices"][0]["logprobs"]["content"]
    assert len(entries) == 10 and all(len(e["top_logprobs"]) == 2 for e in entries)


def test_streamed_context_only_carries_the_handle(service):
    request = body(stream=True, disaggregated_params={"request_type": "context_only"})
    events = call(service, request)
    handles = [
        e["disaggregated_params"]
        for e in events
        if isinstance(e, dict) and "disaggregated_params" in e
    ]
    assert len(handles) == 1 and handles[0]["request_type"] == "context_only"
    resume = {
        "request_type": "generation_only",
        "ctx_request_id": handles[0]["ctx_request_id"],
        "opaque_state": handles[0]["opaque_state"],
    }
    assert (
        call(service, body(max_tokens=3, disaggregated_params=resume))["usage"]["completion_tokens"]
        == 3
    )


def test_unknown_wrong_or_expired_handles_are_400(service):
    def resume(ctx_request_id, opaque_state, **fields):
        params = {
            "request_type": "generation_only",
            "ctx_request_id": ctx_request_id,
            "opaque_state": opaque_state,
        }
        return body(disaggregated_params=params, **fields)

    assert refused(service, resume(987654, "nope"))["param"] == "disaggregated_params"
    handle = call(service, body(disaggregated_params={"request_type": "context_only"}))[
        "disaggregated_params"
    ]
    refused(service, resume(handle["ctx_request_id"], "forged"))
    # Another prompt cannot take over the context's KV blocks...
    other = [{"role": "user", "content": "Something else entirely."}]
    refused(service, resume(handle["ctx_request_id"], handle["opaque_state"], messages=other))
    # ...and neither attempt used the handle up.
    assert call(service, resume(handle["ctx_request_id"], handle["opaque_state"], max_tokens=2))
    contexts = service.frontend.engine.engine.contexts
    ttl = contexts.ttl_s
    contexts.ttl_s = 0.0
    try:
        handle = call(service, body(disaggregated_params={"request_type": "context_only"}))[
            "disaggregated_params"
        ]
    finally:
        contexts.ttl_s = ttl
    refused(service, resume(handle["ctx_request_id"], handle["opaque_state"]))
    assert refused(service, body(disaggregated_params={"request_type": "generation_only"}))
    assert refused(service, body(disaggregated_params={"request_type": "sideways"}))
    # Expired blocks went back to the cache.
    call(service, body(max_tokens=1))
    assert len(contexts) == 0
    assert service.frontend.engine.engine.block_manager.num_used_blocks == 0


def test_user_messages_still_render_with_the_models_template(service):
    # A guard for the edits above: the default path is untouched.
    expected = service.frontend.tokenizer.apply_chat_template(
        USER, tokenize=False, add_generation_prompt=True
    )
    assert prompt_ids(service) == service.frontend.tokenizer.encode(
        expected, add_special_tokens=False
    )
