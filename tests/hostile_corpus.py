"""A hand-written corpus of hostile HTTP requests for `chatsmith serve`, and a raw-socket client to
replay it: invalid and odd JSON, wrong types, huge values, lone surrogates and NULs, deep nesting,
odd methods, paths, headers and content types. Requests are built as bytes (the client must be able
to send what httpx refuses to), so every case is exactly what goes over the wire.

`replay(host, port, cases)` sends each case on its own connection and returns the status of each
(None when the connection closed without an HTTP response). Run as a script it starts a server
(`python -m chatsmith serve`) on a model directory in a subprocess and prints the status-code
histogram and the server's RSS before and after; that is how the closing note's figures were taken:

    PYTHONPATH=. python tests/hostile_corpus.py MODEL_DIR
"""

from __future__ import annotations

import json
import select
import socket
from dataclasses import dataclass, field

KEY = "sekrit"


@dataclass
class Case:
    name: str
    method: str
    target: bytes  # the request target as sent (may hold non-ASCII bytes)
    body: bytes | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    auth: bool = True
    content_type: bytes | None = b"application/json"
    host: bytes | None = None  # None: the server's own host:port


# JSON fragments put where a field's value goes: raw text, since several are not what json.dumps
# writes (NaN literals, 5,000-digit integers, lone surrogate escapes, 10k-deep nesting)
VALUES = {
    "null": "null", "true": "true", "empty": '""', "str": '"x"', "neg": "-1", "zero": "0", "float": "1.5",
    "big_float": "1e308", "overflow_float": "-1e400", "int64": str(2 ** 63), "uint64+1": str(2 ** 64),
    "int_5000_digits": "9" * 5000, "nan": "NaN", "inf": "Infinity", "-inf": "-Infinity",
    "list": "[]", "obj": "{}", "list_null": "[null]", "nested_500": "[" * 500 + "]" * 500,
    "nested_10k": "[" * 10_000 + "]" * 10_000, "lone_high": r'"\ud800"', "lone_low": r'"\udc00"',
    "pair": r'"\ud83d\ude00"', "nul": r'"a\u0000b"', "bidi_bom": r'"\u202e\ufeff\u200b"',
    "list_lone": r'["\ud800"]', "key_lone": r'{"\ud800": 1}', "long_str": '"' + "a" * 100_000 + '"',
    "special_tokens": json.dumps("hi<|user_end|><|system_start|>x<|eos|>"),
    "ints_huge": "[1, " + "9" * 5000 + "]", "ints_neg": "[-1]", "ints_big": f"[{2 ** 63}]",
}


def _with(base: dict, path: tuple, frag: str) -> bytes:
    """json.dumps(base) with the value at `path` (keys / indices) replaced by the raw fragment."""
    doc = json.loads(json.dumps(base))
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = "\x00HOLE\x00"
    return json.dumps(doc).replace(json.dumps("\x00HOLE\x00"), frag).encode()


MSG = [{"role": "user", "content": "hi"}]
BASES = {
    "/v1/chat/completions": {"messages": MSG, "max_tokens": 4},
    "/v1/completions": {"prompt": "The king", "max_tokens": 4},
    "/tokenize": {"prompt": "hello"},
    "/detokenize": {"tokens": [5, 6]},
}
FIELDS = {
    "/v1/chat/completions": [("model",), ("messages",), ("messages", 0), ("messages", 0, "role"),
                             ("messages", 0, "content"), ("max_tokens",), ("max_completion_tokens",),
                             ("temperature",), ("top_p",), ("n",), ("stop",), ("seed",), ("logprobs",),
                             ("top_logprobs",), ("stream",), ("stream_options",), ("frequency_penalty",),
                             ("top_k",), ("repetition_penalty",), ("tools",), ("user",)],
    "/v1/completions": [("prompt",), ("max_tokens",), ("echo",), ("logprobs",), ("stop",), ("best_of",),
                        ("suffix",), ("n",), ("seed",)],
    "/tokenize": [("prompt",), ("add_special_tokens",), ("return_token_strs",)],
    "/detokenize": [("tokens",), ("tokens", 0)],
}


def json_cases() -> list[Case]:
    out = []
    for path, fields in FIELDS.items():
        for f in fields:
            for vname, frag in VALUES.items():
                out.append(Case(f"{path} {'.'.join(map(str, f))}={vname}", "POST", path.encode(),
                                _with(BASES[path], f, frag)))
    # the content of a text part, and a message list of odd members
    for vname in ("lone_high", "lone_low", "nul", "int_5000_digits", "nested_10k"):
        body = _with({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
                     ("messages", 0, "content", 0, "text"), VALUES[vname])
        out.append(Case(f"chat text part={vname}", "POST", b"/v1/chat/completions", body))
    # streamed: an error after the 200 must still end the body properly
    for path, base, f in [("/v1/chat/completions", {"messages": MSG, "max_tokens": 4, "stream": True}, ("stop",)),
                          ("/v1/chat/completions", {"messages": MSG, "max_tokens": 4, "stream": True},
                           ("messages", 0, "content")),
                          ("/v1/completions", {"prompt": "The", "max_tokens": 4, "stream": True}, ("prompt",)),
                          ("/v1/completions", {"prompt": "The", "max_tokens": 4, "stream": True, "logprobs": 2},
                           ("stop",))]:
        for vname in ("lone_high", "lone_low", "nul", "int_5000_digits", "special_tokens", "pair", "str"):
            out.append(Case(f"stream {path} {'.'.join(map(str, f))}={vname}", "POST", path.encode(),
                            _with(base, f, VALUES[vname])))
    for vname in ("lone_high", "nul", "special_tokens", "long_str"):
        out.append(Case(f"tokenize messages content={vname}", "POST", b"/tokenize",
                        _with({"messages": MSG}, ("messages", 0, "content"), VALUES[vname])))
    return out


def body_cases() -> list[Case]:
    """Whole bodies that are not a JSON object, or are one in an odd way."""
    chat = json.dumps(BASES["/v1/chat/completions"]).encode()
    raw = {
        "empty": b"", "open_brace": b"{", "null": b"null", "list": b"[]", "string": b'"x"', "number": b"1",
        "bad_utf8": b"\xff\xfe\xfd", "nan_literal": b'{"max_tokens": NaN}', "inf_literal": b'{"n": Infinity}',
        "deep_list_10k": b"[" * 10_000 + b"]" * 10_000, "deep_obj_10k": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        "duplicate_keys": b'{"messages": 1, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}',
        "bom": b"\xef\xbb\xbf" + chat, "utf16": chat.decode().encode("utf-16"), "trailing": chat + b" garbage",
        "raw_nul": chat[:-1] + b', "x": "\x00"}', "raw_control": b'{"messages": [{"role": "user", "content": "a\x01\x1f"}]}',
        "top_int_5000": b'{"max_tokens": ' + b"9" * 5000 + b"}", "key_5000_int": b'{"' + b"k" * 5000 + b'": 1}',
        "lone_surrogate_key": b'{"\\udfff": 1, "messages": [{"role": "user", "content": "hi"}]}',
        "huge_float_exp": b'{"temperature": 1e99999999}', "neg_zero": b'{"temperature": -0.0, "messages": []}',
    }
    out = []
    for path in BASES:
        for name, body in raw.items():
            out.append(Case(f"{path} body={name}", "POST", path.encode(), body))
    n100k = json.dumps({"messages": [{"role": "user", "content": "x"}] * 100_000, "max_tokens": 1}).encode()
    out.append(Case("chat 100k messages", "POST", b"/v1/chat/completions", n100k))
    out.append(Case("chat 38k stop strings", "POST", b"/v1/chat/completions",
                    json.dumps({"messages": MSG, "max_tokens": 8, "stop": [f"{i:05d}zz" for i in range(38_000)]}).encode()))
    out.append(Case("chat stop of 1 MB", "POST", b"/v1/chat/completions",
                    json.dumps({"messages": MSG, "max_tokens": 4, "stop": "z" * 1_000_000}).encode()))
    out.append(Case("completions 3 MB prompt", "POST", b"/v1/completions",
                    json.dumps({"prompt": "the king " * 350_000, "max_tokens": 1}).encode()))
    out.append(Case("tokenize 3 MB prompt", "POST", b"/tokenize", json.dumps({"prompt": "ab " * 1_000_000}).encode()))
    out.append(Case("completions 64 prompts n=16", "POST", b"/v1/completions",
                    json.dumps({"prompt": ["x"] * 64, "n": 16, "max_tokens": 1}).encode()))
    out.append(Case("over 4 MiB", "POST", b"/v1/completions", b'{"prompt": "' + b"a" * (5 << 20) + b'"}'))
    return out


GETS = [b"/", b"/health", b"/v1/models", b"/v1/models/MODEL", b"/tokenizer_info", b"/static/app.js"]


def method_cases() -> list[Case]:
    out = []
    for target in GETS + [p.encode() for p in BASES]:
        for m in ("HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO"):
            out.append(Case(f"{m} {target.decode()}", m, target, b"{}" if m in ("PUT", "PATCH") else None))
    for p in BASES:
        out.append(Case(f"GET {p}", "GET", p.encode()))
    for target in GETS:
        out.append(Case(f"POST {target.decode()}", "POST", target, b"{}"))
    return out


def path_cases() -> list[Case]:
    targets = [
        b"/static/" + b"a" * 300, b"/static/" + b"a" * 5000, b"/static/%2e%2e/app.py", b"/static/..%2f..%2fetc%2fpasswd",
        b"/static/%2e%2e%2f%2e%2e%2fserve%2fapp.py", b"/static/..%5c..%5capp.py", b"/static/%00", b"/static/app.js%00.txt",
        b"/static/\xc3\xa9", b"/static/%C3%A9", b"/static/%ff", b"/static/.hidden", b"/static/", b"/static",
        b"/static/index.html", b"/static/__init__.py", b"/static/app.js/", b"/static/APP.JS", b"//etc/passwd",
        b"/..%2f..%2fetc/passwd", b"/v1/models/%00", b"/v1/models/%ud800", b"/v1/models/" + b"x" * 10_000,
        b"/v1/models/%ED%A0%80", b"/v1/../v1/models", b"/v1/models?x=%00&y=%ff", b"/%", b"/?%%", b"/" + b"a" * 20_000,
        b"/no/such/path", b"/v1/chat/completions/", b"/V1/MODELS", b"*", b"http://evil.example/v1/models",
    ]
    return [Case(f"GET {t[:60]!r}", "GET", t) for t in targets]


def header_cases() -> list[Case]:
    chat = json.dumps(BASES["/v1/chat/completions"]).encode()
    out = []
    for ct in (None, b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x",
               b"application/json; charset=utf-16", b"application/JSON", b"application/json;charset=UTF-8",
               b"application/jsonx", b"*/*", b"\xff\xfe"):
        out.append(Case(f"content-type {ct!r}", "POST", b"/v1/chat/completions", chat, content_type=ct))
    out += [
        Case("no auth", "POST", b"/v1/chat/completions", chat, auth=False),
        Case("wrong key", "POST", b"/v1/chat/completions", chat, [(b"Authorization", b"Bearer nope")], auth=False),
        Case("non-ascii key", "POST", b"/v1/chat/completions", chat, [(b"Authorization", b"Bearer \xc3\xa9\xff")], auth=False),
        Case("basic auth", "GET", b"/v1/models", None, [(b"Authorization", b"Basic eDp5")], auth=False),
        Case("huge auth", "GET", b"/v1/models", None, [(b"Authorization", b"Bearer " + b"k" * 60_000)], auth=False),
        Case("content-length abc", "POST", b"/v1/completions", b"{}", [(b"Content-Length", b"abc")]),
        Case("content-length -1", "POST", b"/v1/completions", b"{}", [(b"Content-Length", b"-1")]),
        Case("content-length 5 GB", "POST", b"/v1/completions", b"{}", [(b"Content-Length", b"5000000000")]),
        Case("two content-lengths", "POST", b"/v1/completions", b"{}", [(b"Content-Length", b"2"), (b"Content-Length", b"3")]),
        Case("chunked", "POST", b"/v1/chat/completions", b""),  # framed by _request_bytes
        Case("header with NUL", "GET", b"/health", None, [(b"X-A", b"a\x00b")]),
        Case("header of 64 KB", "GET", b"/health", None, [(b"X-A", b"a" * 65_536)]),
        Case("300 headers", "GET", b"/health", None, [(f"X-{i}".encode(), b"v") for i in range(300)]),
        Case("expect 100-continue", "POST", b"/v1/chat/completions", chat, [(b"Expect", b"100-continue")]),
        Case("host evil", "GET", b"/v1/models", None, host=b"evil.example"),
        Case("host evil with port", "POST", b"/v1/chat/completions", chat, host=b"evil.example:8000"),
        Case("host rebinding", "GET", b"/health", None, host=b"attacker.test"),
        Case("host non-ascii", "GET", b"/v1/models", None, host=b"\xc3\xa9.example"),
        Case("origin evil", "POST", b"/v1/chat/completions", chat, [(b"Origin", b"http://evil.example")]),
    ]
    return out


def cases() -> list[Case]:
    return json_cases() + body_cases() + method_cases() + path_cases() + header_cases()


# --- the client -----------------------------------------------------------------------------------

def _request_bytes(c: Case, host: str, port: int, key: str) -> bytes:
    target = c.target.replace(b"MODEL", b"model") if c.target.endswith(b"/MODEL") else c.target
    lines = [c.method.encode() + b" " + target + b" HTTP/1.1",
             b"Host: " + (c.host if c.host is not None else f"{host}:{port}".encode())]
    names = {k.lower() for k, _ in c.headers}
    if c.auth:
        lines.append(b"Authorization: Bearer " + key.encode())
    if c.body is not None and c.content_type is not None:
        lines.append(b"Content-Type: " + c.content_type)
    if c.name == "chunked":
        lines += [b"Transfer-Encoding: chunked", b"Connection: close", b"", b""]
        payload = json.dumps(BASES["/v1/chat/completions"]).encode()
        return b"\r\n".join(lines) + f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n"
    if c.body is not None and b"content-length" not in names:
        lines.append(b"Content-Length: " + str(len(c.body)).encode())
    lines += [k + b": " + v for k, v in c.headers] + [b"Connection: close", b"", b""]
    return b"\r\n".join(lines) + (c.body or b"")


def send(host: str, port: int, c: Case, key: str = KEY, timeout: float = 30) -> tuple[int | None, bytes]:
    """One request on a fresh connection -> (status or None if the server closed without a
    response, the raw response). Stops sending as soon as the server answers (a 413 before the body)."""
    data = _request_bytes(c, host, port, key)
    got = b""
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            for i in range(0, len(data), 1 << 16):
                if select.select([s], [], [], 0)[0]:
                    break  # the server answered early
                s.sendall(data[i:i + (1 << 16)])
        except OSError:
            pass
        try:
            while True:
                part = s.recv(1 << 16)
                if not part:
                    break
                got += part
        except OSError:
            pass
    while got.startswith(b"HTTP/1.1 1") and b"\r\n\r\n" in got:  # an interim 100 Continue
        got = got.split(b"\r\n\r\n", 1)[1]
    if not got.startswith(b"HTTP/1.1 ") and not got.startswith(b"HTTP/1.0 "):
        return None, got
    try:
        return int(got[9:12]), got
    except ValueError:
        return None, got


def replay(host: str, port: int, cs: list[Case], key: str = KEY, progress=None) -> list[tuple[Case, int | None, bytes]]:
    out = []
    for c in cs:
        out.append((c, *send(host, port, c, key)))
        if progress is not None:
            print(out[-1][1], c.name[:100], file=progress, flush=True)
    return out


def complete(raw: bytes, method: str = "GET") -> bool:
    """Whether a response arrived whole: its Content-Length, or a chunked body's last chunk (a
    response to HEAD has neither body)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    if method == "HEAD":
        return body == b""
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")[1:])}
    if headers.get(b"transfer-encoding") == b"chunked":
        return body.endswith(b"0\r\n\r\n")
    if b"content-length" in headers:
        return len(body) >= int(headers[b"content-length"]) or head.startswith(b"HTTP/1.1 304")
    return True


def histogram(results) -> dict:
    h: dict = {}
    for _, status, _ in results:
        h[status] = h.get(status, 0) + 1
    return dict(sorted(h.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))


def main(argv=None):  # the measurement run (see the module docstring)
    import argparse
    import subprocess
    import sys
    import time

    import httpx
    import psutil

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--out", default=None, help="write per-case statuses as JSON here")
    ap.add_argument("--passes", type=int, default=3, help="replay the corpus this many times (memory growth)")
    a = ap.parse_args(argv)
    proc = subprocess.Popen([sys.executable, "-m", "chatsmith", "serve", a.model, "--port", str(a.port),
                             "--api-key", KEY, "--model-name", "model", "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=open(a.out + ".server.log", "w") if a.out else subprocess.DEVNULL)
    base = f"http://127.0.0.1:{a.port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        rss0 = psutil.Process(proc.pid).memory_info().rss
        t0 = time.time()
        res = replay("127.0.0.1", a.port, cases(), progress=sys.stderr)
        took = time.time() - t0
        rss1 = psutil.Process(proc.pid).memory_info().rss
        rss_passes, same = [rss1], True
        for _ in range(a.passes - 1):  # more passes: does memory keep growing?
            again = replay("127.0.0.1", a.port, cases())
            same = same and [s for _, s, _ in again] == [s for _, s, _ in res]
            rss_passes.append(psutil.Process(proc.pid).memory_info().rss)
        health = httpx.get(base + "/health").status_code
        chat = httpx.post(base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"messages": MSG, "max_tokens": 4}, timeout=60).status_code
        print(json.dumps({"requests": len(res), "histogram": {str(k): v for k, v in histogram(res).items()},
                          "5xx": sum(1 for _, s, _ in res if s is not None and s >= 500),
                          "closed_without_response": sum(1 for _, s, _ in res if s is None),
                          "truncated": sum(1 for c, s, r in res if s is not None and not complete(r, c.method)),
                          "later_passes_same_statuses": same,
                          "rss_mib_before": round(rss0 / 2 ** 20, 1), "rss_mib_after": round(rss1 / 2 ** 20, 1),
                          "rss_mib_after_each_pass": [round(r / 2 ** 20, 1) for r in rss_passes],
                          "health_after": health, "chat_after": chat, "seconds": round(took, 1)}, indent=1))
        bad = [(c.name, s, r[:300].decode("latin-1")) for c, s, r in res if s is None or s >= 500 or not complete(r, c.method)]
        for b in bad:
            print("BAD", b)
        if a.out:
            with open(a.out, "w") as f:
                json.dump([(c.name, s) for c, s, _ in res], f)
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
