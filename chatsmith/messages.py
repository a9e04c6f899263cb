"""Chat messages: the roles, one validation of OpenAI-style message lists, the held-out leak check.

A conversation is a list of {"role", "content"} turns, role one of system / user / assistant,
content a string. What arrives from outside (a JSON file, an API request) may also say
"developer" (OpenAI's newer name for the system turn) and may give content as a list of text
parts [{"type": "text", "text": ...}]; `check_messages` turns that into the plain form or raises
`MessageError(field, problem)`. Each caller words the error for its own user: the API as an
OpenAI error with `param` = field, file readers as "file:line: field problem".
"""

from __future__ import annotations

import json

ROLES = ("system", "user", "assistant")
# with tools (check_messages(tools=True)): tool results come back in turns of their own
TOOL_ROLES = (*ROLES, "tool")
# other names for our roles that OpenAI's API accepts
ALIASES = {"developer": "system"}


class MessageError(ValueError):
    """A message list is not valid: `field` names the place (messages[2].content), `problem` what
    is wrong ("must be a string")."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def role_of(role, field: str, aliases: dict[str, str] = ALIASES, roles: tuple = ROLES) -> str:
    role = aliases.get(role, role) if isinstance(role, str) else role
    if role not in roles:
        raise MessageError(field, f"must be {', '.join(roles[:-1])} or {roles[-1]}, got {role!r}")
    return role


def _tool_calls(calls, field: str) -> list[dict]:
    """An assistant turn's OpenAI tool_calls -> [{"id", "type": "function", "function": {"name",
    "arguments"}}] (arguments: the JSON string the API carries, kept as given)."""
    if not isinstance(calls, list):
        raise MessageError(field, "must be a list")
    out = []
    for j, c in enumerate(calls):
        where = f"{field}[{j}]"
        if not isinstance(c, dict) or c.get("type", "function") != "function" or not isinstance(c.get("function"), dict):
            raise MessageError(where, "must be {\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}}")
        if not isinstance(c.get("id"), str) or not c["id"]:
            raise MessageError(f"{where}.id", "must be a non-empty string")
        f = c["function"]
        if not isinstance(f.get("name"), str) or not f["name"]:
            raise MessageError(f"{where}.function.name", "must be a non-empty string")
        if not isinstance(f.get("arguments", ""), str):
            raise MessageError(f"{where}.function.arguments", "must be a string (JSON text)")
        out.append({"id": c["id"], "type": "function",
                    "function": {"name": f["name"], "arguments": f.get("arguments", "")}})
    return out


def content_text(content, field: str) -> str:
    """A string as is; OpenAI text parts joined by newlines (any other part is an error)."""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise MessageError(field, "only text parts are supported" if isinstance(part, dict)
                                   else f"[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}}")
            texts.append(part["text"])
        return "\n".join(texts)
    if not isinstance(content, str):
        raise MessageError(field, "must be a string")
    return content


def check_messages(msgs, field: str = "messages", *, aliases: dict[str, str] = ALIASES, parts: bool = True,
                   null_assistant: bool = False, last_user: bool = False, tools: bool = False) -> list[dict]:
    """Validate and normalise a message list -> [{"role", "content"}] with our role names.

    parts: accept content as text parts. null_assistant: an assistant turn with content null is
    "" (the API allows it for tool calls). last_user: the last turn must be a non-empty user turn
    (a prompt to answer). tools: assistant turns may carry "tool_calls", and "tool" turns answer
    them, each with the "tool_call_id" of a call made earlier in the conversation."""
    if not isinstance(msgs, list) or not msgs:
        raise MessageError(field, "must be a non-empty list")
    out, calls = [], set()
    for i, m in enumerate(msgs):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise MessageError(where, "must be an object")
        role = role_of(m.get("role"), f"{where}.role", aliases, TOOL_ROLES if tools else ROLES)
        content = m.get("content")
        if content is None and null_assistant and role == "assistant":
            content = ""
        if isinstance(content, list) and not parts:
            raise MessageError(f"{where}.content", "must be a string")
        turn = {"role": role, "content": content_text(content, f"{where}.content")}
        if tools and role == "assistant" and m.get("tool_calls") is not None:
            turn["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
            calls.update(c["id"] for c in turn["tool_calls"])
        elif tools and role == "tool":
            if m.get("tool_call_id") not in calls:
                raise MessageError(f"{where}.tool_call_id", "must be the id of a tool call made earlier in "
                                                            f"the conversation, got {m.get('tool_call_id')!r}")
            turn["tool_call_id"] = m["tool_call_id"]
        out.append(turn)
    if last_user and (out[-1]["role"] != "user" or not out[-1]["content"].strip()):
        raise MessageError(f"{field}[{len(out) - 1}]", "must be the user's question (a non-empty user turn)")
    return out


# --- held-out hygiene ------------------------------------------------------------------------------

def conversation_key(messages: list[dict]) -> str:
    """An exact, order-sensitive key of a conversation (or prompt) for set membership."""
    return json.dumps(messages, ensure_ascii=False)


def heldout_overlap(train: list[list[dict]], heldout: list[list[dict]]) -> int:
    """How many held-out conversations (or prompts) also occur, verbatim, in the training data.
    Any overlap makes held-out figures measure memory, not generalisation."""
    keys = {conversation_key(m) for m in train}
    return sum(conversation_key(m) in keys for m in heldout)


__all__ = ["ROLES", "TOOL_ROLES", "ALIASES", "MessageError", "role_of", "content_text", "check_messages",
           "conversation_key", "heldout_overlap"]
