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
# the same schemas, extracted unchanged, for a checkout without shared/ beside it (a clean CI clone)
SUBSET = Path(__file__).resolve().parent / "data" / "openai_openapi_subset.json"
URI = "urn:openai:openapi"


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
    return schemas


@functools.cache
def _registry():
    import json

    import yaml
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    if SPEC.exists():
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        with SPEC.open(encoding="utf-8") as f:
            doc = yaml.load(f, Loader=loader)
    elif SUBSET.exists():
        doc = json.loads(SUBSET.read_text(encoding="utf-8"))
    else:
        pytest.skip(f"the OpenAI OpenAPI document is not at {SPEC}, nor its extract at {SUBSET}")
    doc = {"components": {"schemas": _patch_gaps(_nullable_to_2020(doc["components"]["schemas"]))}}
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
