"""Property-based fuzzing of `chatsmith serve` from OpenAI's OpenAPI document (issue 22).

schemathesis (on hypothesis) generates requests from the operations the server implements
(`openapi_schema.OPERATIONS`: chat and legacy completions, embeddings, the model list and card), both ones the
schema allows and ones it does not, and sends them to a live server on the micro model. Each must
end with an HTTP response (a closed connection fails the call), none may be a 5xx, a 200 must match
the document's response schema (each chunk of a stream, too, ending with [DONE]) and a 4xx must be
OpenAI's error shape. Half the generated bodies name this server's model, so they get past the
model check and into the sampler.

The document is the full one beside the checkout when there is one, else the extract in
tests/data (the test's output says which). The default run is bounded (a fixed example count,
derandomised, a per-request deadline that only a stalled server misses); `-m slow` runs more.
"""

import copy
import json
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

import openapi_schema
from openapi_schema import validate
from test_serve_hostile import KEY, live  # noqa: F401  (the live server fixture)

H = {"Authorization": f"Bearer {KEY}"}
STREAM_SCHEMA = {"/chat/completions": "CreateChatCompletionStreamResponse",
                 "/completions": "CreateCompletionStreamChunk"}


def strategy(schema):
    return st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))


def one_request(url: str, case, ours: bool, stats: Counter):
    if ours and isinstance(case.body, dict):
        case.body["model"] = "embed" if case.operation.path == "/embeddings" else "model"
    r = case.call(base_url=url + "/v1", headers=H, timeout=60)  # no response: requests raises
    stats[r.status_code] += 1
    assert r.status_code < 500, (r.status_code, r.text[:300])
    ctype = (r.headers.get("content-type") or [""])[0]  # schemathesis keeps every value of a header
    if ctype.startswith("text/event-stream"):
        assert r.status_code == 200
        # SSE lines end with \n only; str.splitlines would also split at U+2028, U+0085 in a token
        lines = [ln[6:] for ln in r.content.decode("utf-8").split("\n") if ln.startswith("data: ")]
        assert lines and lines[-1] == "[DONE]", lines[-3:]
        for ln in lines[:-1]:
            validate(json.loads(ln), STREAM_SCHEMA[case.operation.path])
        return
    if case.operation.path == "/embeddings" and r.status_code == 200:
        validate(r.json(), "CreateEmbeddingResponse")  # patched: base64 vectors are strings (openapi_schema)
        return
    case.validate_response(r, checks=[not_a_server_error, response_schema_conformance])
    if r.status_code >= 400:
        validate(r.json(), "ErrorResponse")


def fuzz(url: str, examples: int, derandomize: bool) -> Counter:
    doc, source = openapi_schema.document()
    schema = schemathesis.openapi.from_dict(copy.deepcopy(doc))
    # schemathesis stops reading a stream after 20 events by default; n=16 x 2 prompts sends more,
    # and the check is that the whole stream arrives, ending with [DONE]
    schema.config.max_stream_events = 100_000
    stats: Counter = Counter()

    @settings(max_examples=examples, deadline=30_000, derandomize=derandomize, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy(schema), ours=st.booleans())
    def run(case, ours):
        one_request(url, case, ours, stats)

    run()
    print(f"\nfuzzed from {source}: {sum(stats.values())} requests, statuses {dict(sorted(stats.items()))}")
    return stats


def test_fuzz_from_the_openapi_document(live):  # noqa: F811
    url, _, _ = live
    stats = fuzz(url, examples=120, derandomize=True)
    assert stats[200] > 0 and sum(stats.values()) >= 120  # it reached the sampler, and ran them all
    from test_serve_hostile import still_serving

    still_serving(url)


@pytest.mark.slow
def test_fuzz_from_the_openapi_document_long(live):  # noqa: F811
    url, _, _ = live
    stats = fuzz(url, examples=3000, derandomize=False)
    assert stats[200] > 0
