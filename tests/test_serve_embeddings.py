"""POST /v1/embeddings: an encoder served alone and next to a chat model, through the official SDK
and raw HTTP; vectors equal the encoder engine's, base64 equals float, usage counts tokens, the
response matches OpenAI's schema, and bad requests are OpenAI-shaped 4xx."""

import base64
import json

import httpx
import numpy as np
import pytest
from openapi_schema import validate
from test_serve_hostile import start

from chatsmith.encoder_engine import EncoderEngine
from chatsmith.wordpiece import EncoderTokenizer

openai = pytest.importorskip("openai")
H = {"Authorization": "Bearer k"}


@pytest.fixture(scope="module")
def server(encoder_dir):
    from chatsmith.serve.app import create_app

    url, _, srv = start(create_app(encoder_dir, api_key="k", model_name="enc"))
    yield url
    srv.should_exit = True


def test_sdk_embeddings_equal_the_engine_and_match_the_schema(server, encoder_dir):
    client = openai.OpenAI(base_url=server + "/v1", api_key="k")
    texts = ["the king said to the queen", "love and war", "春眠不觉晓"]
    r = client.embeddings.create(model="enc", input=texts)
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    want = EncoderEngine.load(str(encoder_dir)).embed(texts).numpy()
    assert got.shape == (3, 32) and np.abs(got - want).max() < 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    tok = EncoderTokenizer.load(encoder_dir)
    assert r.usage.prompt_tokens == sum(len(p) + 2 for p in tok.pieces(texts)) == r.usage.total_tokens
    # one string, and token ids (without [CLS]/[SEP]) give the same vectors as the text
    one = client.embeddings.create(model="enc", input=texts[0]).data[0].embedding
    ids = tok.pieces([texts[0]])[0]
    by_ids = client.embeddings.create(model="enc", input=ids).data[0].embedding
    by_rows = client.embeddings.create(model="enc", input=[ids, ids]).data
    assert np.allclose(one, got[0], atol=1e-6) and np.allclose(by_ids, one, atol=1e-6) and len(by_rows) == 2
    raw = httpx.post(server + "/v1/embeddings", headers=H,
                     json={"model": "enc", "input": texts, "encoding_format": "base64"}).json()
    validate(raw, "CreateEmbeddingResponse")
    dec = np.frombuffer(base64.b64decode(raw["data"][1]["embedding"]), dtype="<f4")
    assert np.array_equal(dec, got[1])
    validate(httpx.post(server + "/v1/embeddings", headers=H, json={"model": "enc", "input": "love"}).json(),
             "CreateEmbeddingResponse")
    assert [m.id for m in client.models.list().data] == ["enc"]


@pytest.mark.parametrize("body,status,param", [
    ({"model": "enc", "input": ""}, 400, "input"),
    ({"model": "enc", "input": []}, 400, "input"),
    ({"model": "enc", "input": ["ok", ""]}, 400, "input"),
    ({"model": "enc", "input": " ".join(["king"] * 40)}, 400, "input"),   # beyond the 24-token context
    ({"model": "enc", "input": [10 ** 6]}, 400, "input"),
    ({"model": "enc", "input": [[1, 2], "x"]}, 400, "input"),
    ({"model": "enc", "input": "\ud800"}, 400, "input"),
    ({"model": "enc", "input": ["x"] * 2049}, 400, "input"),
    ({"model": "enc", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": "enc", "input": "x", "dimensions": 8}, 400, "dimensions"),
    ({"model": "other", "input": "x"}, 404, "model"),
    ({"input": "x"}, 400, "model"),
    ({"model": "enc"}, 400, "input"),
])
def test_bad_embedding_requests_are_openai_shaped_4xx(server, body, status, param):
    raw = json.dumps(body)  # ASCII escapes, so a lone surrogate travels as JSON allows it: "\ud800"
    r = httpx.post(server + "/v1/embeddings", headers={**H, "Content-Type": "application/json"}, content=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
    assert httpx.get(server + "/health").status_code == 200


def test_an_encoder_server_refuses_chat_clearly(server):
    r = httpx.post(server + "/v1/chat/completions", headers=H,
                   json={"model": "enc", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "embeddings" in r.json()["error"]["message"]
    assert httpx.post(server + "/v1/embeddings", json={"model": "enc", "input": "x"}).status_code == 401


def test_a_chat_model_and_an_encoder_on_one_server(base_model, encoder_dir):
    from chatsmith.serve.app import create_app

    url, _, srv = start(create_app(base_model, model_name="gpt", embeddings=str(encoder_dir),
                                   embeddings_name="enc"))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        assert {m.id for m in client.models.list().data} == {"gpt", "enc"}
        assert len(client.embeddings.create(model="enc", input="love").data[0].embedding) == 32
        out = client.completions.create(model="gpt", prompt="the king", max_tokens=3, temperature=0)
        assert out.choices[0].text is not None
        r = httpx.post(url + "/v1/embeddings", json={"model": "gpt", "input": "x"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    finally:
        srv.should_exit = True
