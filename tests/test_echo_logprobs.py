"""/v1/completions with echo + logprobs: the tokens join to the text (OpenAI's guarantee; clients
slice the text by text_offset), for chatsmith's own tokenizer and an imported one, streamed or not.
A text prompt's <|bos|>, which the server adds and the text does not contain, is not among them."""

import json

import pytest
from fastapi.testclient import TestClient

from chatsmith.serve.app import create_app
from conftest import cli
from openapi_schema import validate

PROMPT = "The king said 你好 to 床前明月光 😀"


@pytest.fixture(scope="module")
def imported_model(tmp_path_factory):
    from test_interop import make_hf

    d = tmp_path_factory.mktemp("hf_llama")
    make_hf("llama", d)
    out = d / "imported"
    assert cli("import", d, out) == 0
    return out


def _check(lp, text):
    assert "".join(lp["tokens"]) == text
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    for tok, off in zip(lp["tokens"], lp["text_offset"]):
        assert text[off:off + len(tok)] == tok


@pytest.mark.parametrize("which", ["chatsmith", "imported"])
def test_echo_logprobs_tokens_join_to_the_text(which, base_model, imported_model):
    model = base_model if which == "chatsmith" else imported_model
    app = create_app(model, None, "m", 8)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        tok = app.state.server.tok
        for max_tokens in (0, 5):
            body = {"prompt": PROMPT, "max_tokens": max_tokens, "echo": True, "logprobs": 1, "temperature": 0}
            r = client.post("/v1/completions", json=body).json()
            validate(r, "CreateCompletionResponse")
            c = r["choices"][0]
            assert c["text"].startswith(PROMPT)
            _check(c["logprobs"], c["text"])
            assert tok.decode([tok.bos_id]) not in c["logprobs"]["tokens"] or not tok.add_bos
            # every token of the text is scored: one logprob per prompt token the text holds
            n_prompt = len(tok.encode(PROMPT))
            lps = c["logprobs"]["token_logprobs"]
            assert len(lps) == n_prompt + r["usage"]["completion_tokens"]
            assert (lps[0] is None) == (not tok.add_bos)  # after <|bos|> the first token has a logprob
            # streamed: the chunks' tokens join to the chunks' text
            text, tokens = "", []
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
                for line in s.iter_lines():
                    if line.startswith("data: {"):
                        ch = json.loads(line[6:])["choices"][0]
                        text += ch["text"]
                        tokens += ch["logprobs"]["tokens"]
            assert text == c["text"] and "".join(tokens) == text
        # a prompt of token ids is echoed as those tokens' text, every one of them included
        ids = tok.encode(PROMPT, bos=True)
        r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}).json()
        c = r["choices"][0]
        _check(c["logprobs"], c["text"])
        assert len(c["logprobs"]["tokens"]) == len(ids) and c["logprobs"]["token_logprobs"][0] is None
