"""Byte-level BPE (Hugging Face `tokenizers`, Rust) with reserved chat tokens.

Byte-level means every UTF-8 byte has a token, so any text round-trips exactly (Chinese, emoji,
code, runs of whitespace); no normaliser runs, for the same reason. Digits are split one per token
so numbers tokenise consistently (helps arithmetic). Saved as `tokenizer.json` +
`tokenizer_config.json`, which `transformers.PreTrainedTokenizerFast` loads.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from chatsmith.data.corpus import iter_input_documents, split_files
from chatsmith.errors import UserError
from chatsmith.flags import Verb
from chatsmith.messages import TOOL_ROLES
from chatsmith.tools import calls as toolcalls

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TOKENS = [
    "<|system_start|>", "<|system_end|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
]
# room for new control tokens without a vocab change; tools use 0-5 (see chatsmith.tools.calls)
RESERVED = [f"<|reserved_{i}|>" for i in range(7)]
SPECIAL_TOKENS = [BOS, EOS, PAD, *CHAT_TOKENS, *RESERVED]

# The chat template, as Jinja for the ecosystem (transformers' apply_chat_template, vLLM, …).
# `render_chat` below is the same thing in Python, plus the loss mask; a test keeps them equal.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '_start|>' + message['content'] + '<|' + message['role'] + '_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant_start|>' }}{% endif %}"
)


# End-of-turn / end-of-text tokens of common imported tokenizers: generation stops at any of them
# that the vocabulary has (llama.cpp calls these end-of-generation tokens).
END_TOKENS = ("<|assistant_end|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "</s>",
              "<end_of_turn>", "<|end_of_text|>")


def _token_str(v) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return v.get("content") if isinstance(v, dict) else v


class Tokenizer:
    def __init__(self, tok: HFTokenizer, path: Path | None = None, config: dict | None = None):
        self.tok = tok
        # the same vocabulary with control-token text read as plain bytes: message content and data are
        # encoded with it, so "<|user_end|>" typed by a user is ten byte tokens, never the real turn end
        # (a second object because the flag is tokenizer state, and serve encodes from several threads)
        self.plain = HFTokenizer.from_str(tok.to_str())
        self.plain.encode_special_tokens = True
        self.path = path
        self.config = dict(config or {})
        # native: a chatsmith-trained tokenizer (our <|...|> tokens, Python chat template, BOS always)
        self.native = all(tok.token_to_id(t) is not None for t in (BOS, EOS, PAD))
        self.chat_template = None
        self.stop_ids: set[int] = set()
        if self.native:
            self.bos_id = tok.token_to_id(BOS)
            self.eos_id = tok.token_to_id(EOS)
            self.pad_id = tok.token_to_id(PAD)
            self.add_bos = True
        else:
            self._init_foreign(path)
        self.stop_ids |= {self.eos_id} | {i for t in END_TOKENS if (i := tok.token_to_id(t)) is not None}

    def _init_foreign(self, path):
        """An imported tokenizer (Hugging Face / GGUF): special tokens, BOS policy and the chat template
        come from its tokenizer_config.json, as transformers reads them."""
        cfg, tok = self.config, self.tok
        ids = {k: tok.token_to_id(s) if (s := _token_str(cfg.get(f"{k}_token"))) else None
               for k in ("bos", "eos", "pad", "unk")}
        if ids["eos"] is None:
            if cfg.get("cls_token") and cfg.get("sep_token"):  # BERT's [CLS]/[SEP]: an encoder's
                raise UserError(f"{path} holds an encoder (BERT-style) model: this command needs a decoder (GPT); "
                                f"encoders are for classify, qa, embed and fill-mask")
            raise UserError(f"tokenizer at {path} is neither a chatsmith tokenizer (no {BOS}/{EOS}/{PAD}) "
                            f"nor names an eos_token in its tokenizer_config.json")
        self.eos_id = ids["eos"]
        self.bos_id = ids["bos"] if ids["bos"] is not None else self.eos_id  # GPT-2: <|endoftext|> is both
        self.pad_id = ids["pad"] if ids["pad"] is not None else self.eos_id
        self.add_bos = bool(cfg.get("add_bos_token", False))
        tpl = cfg.get("chat_template")
        if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
            tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
        self.chat_template = tpl or None

    @property
    def has_chat(self) -> bool:
        """Whether the tokenizer can render conversations: our chat tokens, or a Jinja chat template."""
        return (self.native and self.tok.token_to_id("<|assistant_start|>") is not None) or bool(self.chat_template)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, bos: bool = False, special: bool = False) -> list[int]:
        """bos=True: the start of a document, as the model was trained (chatsmith models always see
        BOS first; an imported model only if its tokenizer_config says add_bos_token).
        special=True: control-token text ("<|eos|>") becomes the control token; only for a raw prompt
        whose writer owns the whole text (completions, generate). Content and data stay plain text."""
        ids = (self.tok if special else self.plain).encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos and self.add_bos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Documents as plain text (a corpus that quotes "<|eos|>" does not end there)."""
        return [e.ids for e in self.plain.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    @property
    def tool_markers(self) -> toolcalls.Markers | None:
        """How this model writes tool calls: our reserved tokens, the ChatML convention for an
        imported ChatML template (SmolLM2's has no tool support of its own), else None (no tools)."""
        if self.native:
            return toolcalls.NATIVE
        return toolcalls.CHATML if self.chat_template and "<|im_start|>" in self.chat_template else None

    def tool_result_ids(self, result: str) -> list[int]:
        """What follows a call the engine ran itself: the end of the assistant's turn, the result in
        a tool turn, the start of the next assistant turn (as `render_chat` renders those turns)."""
        m = self.tool_markers
        return self.encode(m.result_open, special=True) + self.encode(result) + self.encode(m.result_close, special=True)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and a loss mask that is 1 exactly on what the assistant
        says: its reply tokens, its tool calls and its end token (so the model learns to stop),
        never on the prompt, the system message, the user's turns, tool definitions, tool results
        or the <|assistant_start|> cue.

        tools: OpenAI tool definitions, rendered before the conversation; assistant turns may
        carry "tool_calls" and "tool" turns their results (see chatsmith.tools.calls)."""
        if not self.native:
            return self._render_template(*self._chatml_tools(messages, tools), add_generation_prompt)
        ids, mask = [self.bos_id], [0]
        t = self.tok.token_to_id
        if tools:
            defs = self.encode(json.dumps([x["function"] for x in tools], ensure_ascii=False))
            ids += [t(toolcalls.TOOLS_START), *defs, t(toolcalls.TOOLS_END)]
            mask += [0] * (len(defs) + 2)
        for m in messages:
            role = m["role"]
            if role not in TOOL_ROLES:
                raise UserError(f"unknown chat role {role!r}; expected one of {TOOL_ROLES}")
            if role == "tool":
                start, end = t(toolcalls.RESULT_START), t(toolcalls.RESULT_END)
            else:
                start, end = t(f"<|{role}_start|>"), t(f"<|{role}_end|>")
            body = self.encode(m["content"])
            for c in m.get("tool_calls") or ():
                body += [t(toolcalls.NATIVE.call_start),
                         *self.encode(toolcalls.call_body(c["function"]["name"], c["function"]["arguments"])),
                         t(toolcalls.NATIVE.call_end)]
            learn = int(role == "assistant")
            ids += [start, *body, end]
            mask += [0, *[learn] * len(body), learn]
        if add_generation_prompt:
            ids.append(t("<|assistant_start|>"))
            mask.append(0)
        return ids, mask

    def _chatml_tools(self, messages: list[dict], tools: list[dict] | None) -> tuple[list[dict]]:
        """Tools for a ChatML template without tool support, by convention: the definitions in the
        system turn inside <tools></tools>, each call as <tool_call>JSON</tool_call> in the
        assistant's text, results in turns of role "tool" (ChatML renders any role name)."""
        if not tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            return (messages,)
        if self.tool_markers is not toolcalls.CHATML:
            raise UserError("this model's chat template has no tool support (tools need chatsmith's template "
                            "or a ChatML one)")
        out = []
        for m in messages:
            calls = m.get("tool_calls") or ()
            text = m["content"] + "".join(
                f"\n<tool_call>\n{toolcalls.call_body(c['function']['name'], c['function']['arguments'])}\n</tool_call>"
                for c in calls)
            out.append({"role": m["role"], "content": text.lstrip("\n") if calls and not m["content"] else text})
        if tools:
            defs = "\n".join(json.dumps(x["function"], ensure_ascii=False) for x in tools)
            sys_text = ("You can call functions. Their definitions are inside <tools></tools>:\n<tools>\n"
                        f"{defs}\n</tools>\nTo call one, reply with a JSON object {{\"name\": ..., \"arguments\": "
                        "{...}} inside <tool_call></tool_call>; results come back in a tool turn.")
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + sys_text}
            else:
                out.insert(0, {"role": "system", "content": sys_text})
        return (out,)

    def _render_template(self, messages: list[dict], add_generation_prompt: bool) -> tuple[list[int], list[int]]:
        """An imported model's own Jinja chat template (e.g. ChatML). The mask marks each assistant
        turn as the text its rendering adds to the rendering of the conversation before it with a
        generation prompt (the reply, its end token and whatever the template puts after it).

        The template is rendered with a placeholder for each message's content, so its own text
        (and only it) is read with control tokens, and each content is encoded as plain text in its
        place: content cannot forge a turn. A template that changes what it is given (strips it,
        tests it) renders placeholders differently from the content; then the whole rendering is
        encoded, which is safe only if no content holds control-token text, else it is refused."""
        if not self.chat_template:
            raise UserError(f"the tokenizer at {self.path} has no chat template: this model cannot chat")
        for m in messages:
            if not isinstance(m.get("content"), str):
                raise UserError("chat messages need string content")
        holes = [f"\ue000{i}\ue001" for i in range(len(messages))]
        held = [{**m, "content": h} for m, h in zip(messages, holes)]
        render = lambda msgs, gen: _render_jinja(self.chat_template, msgs, gen, self.config)  # noqa: E731
        text = render(held, add_generation_prompt)
        contents = dict(zip(holes, (m["content"] for m in messages)))
        split = lambda s: re.split("(" + "|".join(map(re.escape, contents)) + ")", s) if contents else [s]  # noqa: E731
        if "".join(contents.get(p, p) for p in split(text)) != render(messages, add_generation_prompt):
            self._refuse_control_text(messages)
            held, contents, text = messages, {}, render(messages, add_generation_prompt)
        spans = []
        for i, m in enumerate(held):
            if m["role"] == "assistant":
                a, b = render(held[:i], True), render(held[:i + 1], False)
                if not (b.startswith(a) and text.startswith(b)):
                    raise UserError("the model's chat template does not render a conversation as an extension "
                                    "of its prefix, so the assistant's tokens cannot be located")
                spans.append((len(a), len(b)))
        ids, mask, pos = [], [], 0
        for start, end in spans + [(len(text), len(text))]:
            for piece, learn in ((text[pos:start], 0), (text[start:end], 1)):
                for p in split(piece):
                    if p:
                        e = self.encode(contents[p]) if p in contents else self.encode(p, special=True)
                        ids += e
                        mask += [learn] * len(e)
            pos = end
        return ids, mask

    def _refuse_control_text(self, messages: list[dict]) -> None:
        added = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        for i, m in enumerate(messages):
            # the first control token in the text (not a set's arbitrary order: the message is stable)
            if hit := min((t for t in added if t in m["content"]), key=m["content"].index, default=None):
                raise UserError(f"messages[{i}].content contains the control token {hit!r}, and this model's "
                                f"chat template transforms content, so it cannot be kept as plain text")

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def byte_pieces(self) -> list[bytes] | None:
        """The bytes of every token id, for a byte-level vocabulary (decoding is then these bytes
        joined and read as UTF-8; a special token is its own text); None for any other kind of
        vocabulary. The engine's streaming holds back incomplete UTF-8 sequences with it."""
        if not hasattr(self, "_byte_pieces"):
            self._byte_pieces = None
            if type(self.tok.decoder).__name__ == "ByteLevel":
                byte_of = {c: b for b, c in _bytes_to_unicode().items()}
                pieces = [b""] * self.vocab_size
                for token, i in self.tok.get_vocab().items():
                    if i < self.vocab_size:
                        pieces[i] = (bytes(byte_of[ch] for ch in token) if all(ch in byte_of for ch in token)
                                     else token.encode())
                self._byte_pieces = pieces
        return self._byte_pieces

    def token_bytes(self) -> list[int]:
        """UTF-8 byte length of every token id (0 for special tokens): the denominator of bits-per-byte."""
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        special = set(SPECIAL_TOKENS) | {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        out = [0] * self.vocab_size
        for token, i in self.tok.get_vocab().items():
            if token not in special:
                out[i] = sum(1 for ch in token if ch in byte_of)
        return out

    # --- files --------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike, model_max_length: int | None = None, extra: dict | None = None):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(out / "tokenizer.json"))
        if not self.native:  # an imported tokenizer keeps its own config (special tokens, template)
            cfg = {**self.config, **(extra or {})}
            (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
            return
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length or 1_000_000,
            "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)],
            "chat_template": CHAT_TEMPLATE,
        }
        old = out / "tokenizer_config.json"
        if old.exists():  # keep fields later stages added (e.g. the chat template)
            try:
                cfg = {**json.loads(old.read_text()), **cfg}
            except json.JSONDecodeError:
                pass
        cfg.update(extra or {})
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        p = Path(path)
        f = p / "tokenizer.json" if p.is_dir() else p
        if not f.exists():
            raise UserError(f"no tokenizer at {path}: expected {f} (train one with `chatsmith tokenizer train`)")
        try:
            tok = HFTokenizer.from_file(str(f))
        except Exception as e:  # the Rust loader raises a plain Exception on bad JSON
            raise UserError(f"{f} is not a valid tokenizer.json: {e}") from None
        cf = f.parent / "tokenizer_config.json"
        try:
            config = json.loads(cf.read_text()) if cf.exists() else {}
        except json.JSONDecodeError as e:
            raise UserError(f"{cf} is not valid JSON ({e})") from None
        return cls(tok, p, config)


def _raise_exception(msg):
    raise UserError(f"the chat template refused the conversation: {msg}")


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str):
    """The template compiled once per process: rendering one conversation takes several renders
    (chatsmith/tokenizer.py's masks), and compiling each time made encoding a few thousand
    dialogues for SFT take minutes on a CPU. The environment is immutable, so sharing it is safe."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                  ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    return env.from_string(template)


def _render_jinja(template: str, messages: list[dict], add_generation_prompt: bool, config: dict) -> str:
    """Render a Hugging Face chat template the way transformers does: a sandboxed Jinja environment
    with trim_blocks/lstrip_blocks, the special tokens as variables, raise_exception and tojson."""
    import jinja2

    specials = {k: _token_str(v) for k, v in config.items() if k.endswith("_token") and _token_str(v)}
    try:
        return _compiled_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                   **specials)
    except jinja2.TemplateError as e:
        raise UserError(f"the model's chat template failed to render: {e}") from None


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level alphabet (GPT-2's): byte b is written as one printable unicode char."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def train_tokenizer(texts: Iterator[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    n_min = 256 + len(SPECIAL_TOKENS)
    if vocab_size < n_min:
        raise UserError(f"--vocab-size {vocab_size} is too small: the 256 byte tokens and "
                        f"{len(SPECIAL_TOKENS)} special tokens alone need {n_min}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=sys.stderr.isatty(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


def iter_texts(paths: list[str | os.PathLike], limit_chars: int | None = None) -> Iterator[str]:
    """Document texts from corpus JSONL files (`text` field) or plain text files, streamed."""
    seen = 0
    for _source, text in iter_input_documents([str(p) for p in paths]):
        yield text
        seen += len(text)
        if limit_chars and seen >= limit_chars:
            return


def bytes_per_token(tok: Tokenizer, texts: Iterable[str]) -> float:
    n_bytes = n_tokens = 0
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == 256:
            n_bytes += sum(len(s.encode()) for s in batch)
            n_tokens += sum(map(len, tok.encode_batch(batch)))
            batch = []
    if batch:
        n_bytes += sum(len(s.encode()) for s in batch)
        n_tokens += sum(map(len, tok.encode_batch(batch)))
    return n_bytes / max(n_tokens, 1)


def train_command(inputs: list[str], vocab_size: int, out: str, val: list[str] | None = None,
                  max_chars: int | None = None, min_frequency: int = 2) -> dict:
    t0 = time.time()
    print(f"training byte-level BPE, vocab {vocab_size}, on {', '.join(inputs)}", file=sys.stderr)
    chars = 0

    def counted():
        nonlocal chars
        for t in iter_texts(inputs, max_chars):
            chars += len(t)
            yield t

    tok = train_tokenizer(counted(), vocab_size, min_frequency)
    if not chars:  # it would save the bare byte alphabet and call that a tokenizer
        raise UserError(f"no text to train on in {', '.join(inputs)}: the inputs are empty")
    tok.save(out)
    stats = {"vocab_size": tok.vocab_size, "seconds": round(time.time() - t0, 1)}
    if val:
        stats["val_bytes_per_token"] = round(bytes_per_token(tok, iter_texts(val)), 4)
    Path(out, "tokenizer_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def render_truncated(tok: Tokenizer, messages: list[dict], max_len: int,
                     tools: list[dict] | None = None) -> tuple[list[int], list[int]] | None:
    """The longest prefix of the conversation that ends after an assistant turn and fits in
    max_len tokens (+1 for the shifted target); None when not even the first reply fits."""
    best = None
    for end in range(len(messages), 0, -1):
        if messages[end - 1]["role"] != "assistant":
            continue
        ids, mask = tok.render_chat(messages[:end], tools=tools)
        if len(ids) <= max_len + 1:
            best = (ids, mask)
            break
    return best


def encode_records(tok: Tokenizer, records, max_len: int) -> tuple[list, dict]:
    examples, truncated, dropped = [], 0, 0
    for r in records:
        tools = r.meta.get("tools")  # a function-calling record: the definitions come first
        full = tok.render_chat(r.messages, tools=tools)
        if len(full[0]) <= max_len + 1:
            examples.append(full)
            continue
        cut = render_truncated(tok, r.messages, max_len, tools)
        if cut is None:
            dropped += 1
        else:
            truncated += 1
            examples.append(cut)
    return examples, {"truncated_at_turn": truncated, "dropped_too_long": dropped}


# --- the verb -------------------------------------------------------------------------------------

def _train_arguments(p):
    p.add_argument("--input", nargs="+", required=True,
                   help="corpus .jsonl/.txt/.md files or folders, or a `data build` dir")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokens in the vocabulary, special tokens included")
    p.add_argument("--min-frequency", type=int, default=2, help="a merge must occur at least this often")
    p.add_argument("--max-chars", type=int, default=None, help="train on at most this many characters")
    p.add_argument("--out", required=True, help="tokenizer directory to write")


def _train_main(a):
    val = [str(Path(p) / "val.jsonl") for p in a.input if (Path(p) / "val.jsonl").exists()]
    stats = train_command(split_files(a.input, "train"), a.vocab_size, a.out, val=val or None, max_chars=a.max_chars,
                          min_frequency=a.min_frequency)
    if "val_bytes_per_token" in stats:
        print(f"val bytes/token: {stats['val_bytes_per_token']:.3f}")
    print(f"saved {stats['vocab_size']}-token tokenizer to {a.out}")


VERB = Verb("tokenizer train", "train a byte-level BPE tokenizer on corpus files", _train_arguments, _train_main)
