"""Validate responses against OpenAI's official OpenAPI document (../shared/openai-openapi/openapi.yaml).

The document is OpenAPI 3.1, whose schemas are JSON Schema 2020-12, but it still carries 3.0's
`nullable: true` in places (the streamed chat chunk's `logprobs`, for one). We read that keyword as
its authors meant it, "or null", by rewriting it into 2020-12 before validating; nothing else in the
spec is changed, except the two gaps below where the document disagrees with the API that real
clients are written against. $refs resolve inside the loaded document through `referencing`.

Known gaps, patched explicitly (see `_patch_gaps`):
- legacy completions with `echo` + `logprobs`: the first prompt token has no logprob, and the API
  (and lm-evaluation-harness, which indexes token_logprobs[ctxlen:-1]) has null there; the document
  types the arrays' items as number / object only.
- embeddings requested as base64: `embedding` is then a base64 string, not an array.
- streamed legacy completions: the document says the chunks share CreateCompletionResponse's shape,
  but a chunk before the last has finish_reason null (as in every OpenAI stream and the SDK's type).
  Those chunks are validated against "CreateCompletionStreamChunk", the same schema with a
  nullable finish_reason.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest

SPEC = Path(__file__).resolve().parents[1].parent / "shared" / "openai-openapi" / "openapi.yaml"
# the same schemas and operations, extracted unchanged by `extract` (run this file to rewrite it),
# for a checkout without shared/ beside it (a clean CI clone)
SUBSET = Path(__file__).resolve().parent / "data" / "openai_openapi_subset.json"
URI = "urn:openai:openapi"
# the operations chatsmith serve implements, which the fuzzer (tests/test_serve_fuzz.py) drives
OPERATIONS = {"/chat/completions": "post", "/completions": "post", "/models": "get", "/models/{model}": "get",
              "/embeddings": "post"}
# the schemas `validate` is asked for (and everything they reference)
RESPONSES = ["CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse",
             "ErrorResponse", "ListModelsResponse", "Model", "CreateModerationResponse"]


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def extract(doc: dict) -> dict:
    """The part of the OpenAI document the tests use: OPERATIONS (without their x-oaiMeta
    documentation examples), the RESPONSES schemas, and every component those reference, unchanged."""
    paths = {p: {m: {k: v for k, v in doc["paths"][p][m].items() if k != "x-oaiMeta"}}
             for p, m in OPERATIONS.items()}
    todo = list(_refs(paths)) + [f"#/components/schemas/{n}" for n in RESPONSES]
    seen: set[str] = set()
    comps: dict = {}
    while todo:
        ref = todo.pop()
        if ref in seen:
            continue
        seen.add(ref)
        _, _, kind, name = ref.split("/", 3)
        node = doc["components"][kind][name]
        comps.setdefault(kind, {})[name] = node
        todo.extend(_refs(node))
    comps["securitySchemes"] = {"ApiKeyAuth": doc["components"]["securitySchemes"]["ApiKeyAuth"]}
    return {"openapi": doc["openapi"], "info": {
        "title": doc["info"]["title"], "version": doc["info"]["version"],
        "description": "An extract of OpenAI's official OpenAPI document (shared/openai-openapi/openapi.yaml, "
                       "see its SOURCE.md) made by tests/openapi_schema.py: the operations chatsmith serve "
                       "implements, the response schemas the serving tests validate against and every "
                       "component they reference, unchanged. Used when the full document is not beside the "
                       "checkout (a clean CI clone)."},
        "servers": [{"url": "/v1"}], "security": doc.get("security", []), "paths": paths,
        "components": {k: dict(sorted(v.items())) for k, v in sorted(comps.items())}}


@functools.cache
def document() -> tuple[dict, str]:
    """(the extract, where it came from: the full document's path or the subset's)."""
    import json

    import yaml

    if SPEC.exists():
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        with SPEC.open(encoding="utf-8") as f:
            return extract(yaml.load(f, Loader=loader)), str(SPEC)
    if SUBSET.exists():
        return json.loads(SUBSET.read_text(encoding="utf-8")), str(SUBSET)
    pytest.skip(f"the OpenAI OpenAPI document is not at {SPEC}, nor its extract at {SUBSET}")


def _nullable_to_2020(node):
    if isinstance(node, dict):
        node = {k: _nullable_to_2020(v) for k, v in node.items()}
        if node.pop("nullable", False):
            t = node.get("type")
            if isinstance(t, str):
                node["type"] = [t, "null"]
            elif isinstance(t, list):
                node["type"] = t if "null" in t else [*t, "null"]
            else:
                node = {"anyOf": [node, {"type": "null"}]}
            if "enum" in node and None not in node["enum"]:
                node["enum"] = [*node["enum"], None]
        return node
    if isinstance(node, list):
        return [_nullable_to_2020(v) for v in node]
    return node


def _patch_gaps(schemas: dict) -> dict:
    choice = schemas["CreateCompletionResponse"]["properties"]["choices"]["items"]
    lp = choice["properties"]["logprobs"]["anyOf"][0]["properties"]
    lp["token_logprobs"]["items"] = {"type": ["number", "null"]}
    lp["top_logprobs"]["items"] = {"anyOf": [lp["top_logprobs"]["items"], {"type": "null"}]}
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    fr = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
    fr["type"], fr["enum"] = ["string", "null"], [*fr["enum"], None]
    schemas["CreateCompletionStreamChunk"] = chunk
    # embeddings with encoding_format "base64": the API (and the SDK, which decodes it) sends the vector
    # as a base64 string of little-endian float32s; the document types `embedding` as an array only
    emb = schemas["Embedding"]["properties"]
    emb["embedding"] = {"anyOf": [emb["embedding"], {"type": "string", "contentEncoding": "base64"}]}
    return schemas


@functools.cache
def _registry():
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    doc, _ = document()
    doc = {"components": {"schemas": _patch_gaps(_nullable_to_2020(copy.deepcopy(doc["components"]["schemas"])))}}
    return Registry().with_resource(URI, Resource(doc, specification=DRAFT202012))


@functools.cache
def _validator(name: str):
    from jsonschema import Draft202012Validator

    return Draft202012Validator({"$ref": f"{URI}#/components/schemas/{name}"}, registry=_registry())


def validate(obj, name: str):
    """Raise with every violation listed if obj does not match components.schemas[name]."""
    errors = sorted(_validator(name).iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors[:10]]
        raise AssertionError(f"response does not match {name}:\n" + "\n".join(lines))


if __name__ == "__main__":  # rewrite the subset: python tests/openapi_schema.py [path/to/openapi.yaml]
    import json
    import sys

    import yaml

    src = Path(sys.argv[1]) if len(sys.argv) > 1 else SPEC
    with src.open(encoding="utf-8") as f:
        doc = extract(yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    SUBSET.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {SUBSET} from {src}")
