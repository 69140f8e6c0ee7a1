"""serve/protocol.py: strict parsing (a wrong type is an error, never coerced), the field named in the error,
the unsupported values refused, the chat template."""

import json

import pytest

from hiermem.serve.protocol import (APIError, ChatCompletionRequest, ChatMessage, CompletionRequest, chat_prompt,
                                    completion_logprobs, parse)


def error(model, raw):
    with pytest.raises(APIError) as e:
        req = parse(model, raw)
        req.check()
    return e.value


def test_documented_fields_parse_and_unknown_ones_are_ignored():
    req = parse(CompletionRequest, b'{"prompt": ["a", "b"], "max_tokens": 3, "temperature": 0, "top_p": 0.5, '
                                   b'"stop": "x", "seed": 1, "user": "u", "logit_bias": {"5": -100}, '
                                   b'"stream_options": {"include_usage": true}, "memory": "generic", "someday": 1}')
    assert req.prompt == ["a", "b"] and req.max_tokens == 3 and req.stop == "x" and req.memory == "generic"
    assert req.stream_options.include_usage and req.stops() == ["x"] and req.bias(10) == {5: -100.0}
    assert parse(CompletionRequest, b'{"prompt": [1, 2]}').prompt == [1, 2]
    assert parse(CompletionRequest, b'{"prompt": "x"}').max_tokens == 16  # OpenAI's default


@pytest.mark.parametrize("raw,param,words", [
    (b'{"prompt": "x", "n": "2"}', "n", "valid integer"),
    (b'{"prompt": "x", "stream": 1}', "stream", "valid boolean"),
    (b'{"prompt": "x", "temperature": "hot"}', "temperature", "valid number"),
    (b'{"prompt": "x", "top_p": 0}', "top_p", "greater than 0"),
    (b'{"prompt": "x", "presence_penalty": 3}', "presence_penalty", "less than or equal to 2"),
    (b'{"prompt": "x", "stop": 7}', "stop", "valid"),
    (b'{"prompt": "x", "stream_options": {"include_usage": "yes"}}', "stream_options", "valid boolean"),
    (b'{"max_tokens": 3}', "prompt", "Field required"),
    (b'', None, "not valid JSON"),
])
def test_wrong_types_and_values_name_the_field(raw, param, words):
    e = error(CompletionRequest, raw)
    assert e.status == 400 and e.param == param and words in e.message
    assert e.body() == {"error": {"message": e.message, "type": "invalid_request_error", "param": param,
                                  "code": None}}


def test_values_this_server_cannot_honour_are_refused():
    chat = b'{"messages": [{"role": "user", "content": "hi"}], %s}'
    for extra, param in [(b'"tool_choice": "required"', "tool_choice"), (b'"modalities": ["audio"]', "modalities"),
                         (b'"audio": {"voice": "x"}', "audio"), (b'"functions": [{"name": "f"}]', "functions")]:
        assert error(ChatCompletionRequest, chat % extra).param == param
    ok = parse(ChatCompletionRequest, chat % b'"tools": [], "tool_choice": "none", "response_format": {"type": "text"}')
    ok.check()
    with pytest.raises(APIError, match=r"\[-100, 100\]"):
        parse(CompletionRequest, b'{"prompt": "x", "logit_bias": {"3": 500}}').bias(10)
    with pytest.raises(APIError, match=r"not a token id in \[0, 10\)"):
        parse(CompletionRequest, b'{"prompt": "x", "logit_bias": {"10": 1}}').bias(10)


def test_chat_template_and_routing_text():
    msgs = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Where is Nantes?"),
            ChatMessage(role="assistant", content="In France."),
            ChatMessage(role="user", content=[{"type": "text", "text": "And "}, {"type": "text", "text": "Aisai?"}])]
    prompt, route = chat_prompt(msgs)
    assert prompt == ("System: Be brief.\nUser: Where is Nantes?\nAssistant: In France.\nUser: And Aisai?\n"
                      "Assistant:")
    assert route == "And Aisai?"  # the last user message picks the memory
    req = parse(ChatCompletionRequest, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 5, '
                                       b'"max_completion_tokens": 7}')
    assert req.limit() == 7


def test_legacy_logprobs_offsets():
    lp = completion_logprobs([("He", -0.5, [("He", -0.5), ("A", -1.0)]), ("llo", -0.1, None)], offset=3)
    assert lp == {"tokens": ["He", "llo"], "token_logprobs": [-0.5, -0.1],
                  "top_logprobs": [{"He": -0.5, "A": -1.0}, None], "text_offset": [3, 5]}


def _checkpoint_tokenizer(folder, chat_template):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["</s>", "<unk>", "hi", "there", "user", "assistant"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "unk_token": "<unk>"}
    if chat_template:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_a_checkpoint_chat_template_renders_with_transformers_and_routes_on_the_last_user_turn(tmp_path):
    from hiermem.serve.protocol import checkpoint_chat_template

    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    render = checkpoint_chat_template(str(_checkpoint_tokenizer(tmp_path / "ckpt", template)))
    msgs = [ChatMessage(role="developer", content="be brief"), ChatMessage(role="user", content="hi there"),
            ChatMessage(role="assistant", content="hi"), ChatMessage(role="user", content="where is Paris?")]
    prompt, route = render(msgs)
    assert prompt == "<|system|>be brief\n<|user|>hi there\n<|assistant|>hi\n<|user|>where is Paris?\n<|assistant|>"
    assert route == "where is Paris?"
    assert checkpoint_chat_template(str(_checkpoint_tokenizer(tmp_path / "plain", None))) is None
