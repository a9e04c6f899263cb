"""The generation engine (chatsmith/engine.py) over a mock model and a byte-level tokenizer: no
checkpoint, no training, and outputs known in advance.

The mock model keeps each slot row's tokens in its cache and computes the next-token logits from
that row's whole history (its first token, its length and its last token). A row that is computed
with another row's history, at the wrong length, or from a stale slot gives different text, so
continuous batching mixing rows shows up as wrong output."""

import dataclasses

import pytest
import torch
from torch import nn

from chatsmith.engine import Detokenizer, Engine, SamplingParams, StopMatcher, process_logits
from chatsmith.errors import UserError

BOS, EOS, END = 256, 257, 258  # <|bos|>, <|eos|>, <|assistant_end|>
SPECIALS = {"<|bos|>": BOS, "<|eos|>": EOS, "<|assistant_end|>": END}
VOCAB = 264  # 256 bytes + specials, padded
LETTERS = list(range(ord("a"), ord("z") + 1))


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; a few specials above. What the engine uses of a tokenizer."""

    eos_id, bos_id = EOS, BOS

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return ([BOS] if bos else []) + list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_to_id(self, token: str):
        return SPECIALS.get(token)


def letters_rule(seq: list[int]) -> int:
    """The next token after `seq` (a row's whole history): a letter that depends on the first token,
    the length and the last token, so no two rows of the tests below share a continuation."""
    return LETTERS[(seq[0] * 7 + len(seq) * 3 + seq[-1]) % 26]


def continuation(rule, prompt: list[int], n: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        t = rule(seq)
        if t in (EOS, END):
            break
        seq.append(t)
        out.append(t)
    return out


class MockCfg:
    def __init__(self, max_seq_len: int):
        self.max_seq_len, self.vocab_size = max_seq_len, VOCAB


class MockSlotCache:
    def __init__(self, n_slots: int, max_len: int):
        self.n_slots, self.max_len = n_slots, max_len
        self.tokens = torch.full((n_slots, max_len), -1, dtype=torch.long)
        self.lens = torch.zeros(n_slots, dtype=torch.long)

    def grow(self, n_slots: int, max_len: int):
        n, L = max(n_slots, self.n_slots), max(max_len, self.max_len)
        tokens = torch.full((n, L), -1, dtype=torch.long)
        tokens[:self.n_slots, :self.max_len] = self.tokens
        lens = torch.zeros(n, dtype=torch.long)
        lens[:self.n_slots] = self.lens
        self.tokens, self.lens, self.n_slots, self.max_len = tokens, lens, n, L
        self.grows = getattr(self, "grows", 0) + 1

    def move_row(self, src: int, dst: int, length: int):
        self.tokens[dst, :length] = self.tokens[src, :length]
        self.tokens[dst, length:] = -1  # anything left there is stale: poison it
        self.lens[dst] = length


class MockModel(nn.Module):
    """Deterministic logits: `peak` on rule(history), 0 on the other letters, -inf elsewhere. So
    greedy follows the rule, and sampling at temperature 1 picks the rule's token about
    e^peak / (e^peak + 25) of the time and another letter otherwise."""

    def __init__(self, rule=letters_rule, max_seq_len: int = 64, peak: float = 2.0):
        super().__init__()
        self.cfg = MockCfg(max_seq_len)
        self.rule, self.peak = rule, peak
        self.anchor = nn.Parameter(torch.zeros(1))  # the engine reads the device from parameters()
        self.decode_calls = 0
        self.batch_sizes: list[int] = []

    def logits_for(self, seq: list[int]) -> torch.Tensor:
        assert all(t >= 0 for t in seq), f"a row read a stale or unwritten position: {seq}"
        row = torch.full((VOCAB,), float("-inf"))
        row[LETTERS] = 0.0
        row[self.rule(seq)] = self.peak
        return row

    def fuse_decode_weights(self, quantize=None):
        return None

    def new_slot_cache(self, n_slots: int, max_len: int | None = None):
        return MockSlotCache(n_slots, max_len or self.cfg.max_seq_len)

    def prefill(self, ids, cache: MockSlotCache, row: int, fused=None, every_position=False):
        (T,) = ids.shape
        assert T <= cache.max_len
        cache.tokens[row, :T] = ids
        cache.lens[row] = T
        hist = cache.tokens[row, :T].tolist()
        return torch.stack([self.logits_for(hist[:i + 1]) for i in (range(T) if every_position else [T - 1])])

    def decode_step(self, idx, cache: MockSlotCache, span=None, fused=None):
        B = idx.shape[0]
        self.decode_calls += 1
        self.batch_sizes.append(B)
        pos = cache.lens[:B].clone()
        if span is not None:  # the engine's Python mirror of the lengths must agree with the cache
            assert span == int(pos.max()) + 1, (span, pos)
        assert int(pos.max()) < cache.max_len, "KV cache full"
        out = []
        for b in range(B):
            cache.tokens[b, pos[b]] = idx[b]
            out.append(self.logits_for(cache.tokens[b, :pos[b] + 1].tolist()))
        cache.lens[:B] += 1
        return torch.stack(out)


def make_engine(rule=letters_rule, max_batch: int = 8, **kw) -> Engine:
    return Engine(MockModel(rule, **kw), ByteTokenizer(), max_batch=max_batch)


TOK = ByteTokenizer()
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


def text_of(ids):
    return TOK.decode(ids)


# --------------------------------------------------------------------------- greedy and limits

def test_greedy_follows_the_models_rule():
    engine = make_engine()
    for prompt in ("hi", "The king", "x"):
        ids = TOK.encode(prompt, bos=True)
        (c,) = engine.generate(ids, GREEDY)
        want = continuation(letters_rule, ids, 12)
        assert c.token_ids == want and c.text == text_of(want)
        assert c.finish_reason == "length"


def test_max_new_tokens_gives_finish_reason_length():
    engine = make_engine()
    ids = TOK.encode("abc")
    for n in (1, 5, 20):
        (c,) = engine.generate(ids, dataclasses.replace(GREEDY, max_new_tokens=n))
        assert len(c.token_ids) == n and c.finish_reason == "length"
        assert c.text == text_of(continuation(letters_rule, ids, n))


def test_the_context_limits_the_reply():
    engine = make_engine(max_seq_len=16)
    ids = TOK.encode("0123456789")  # 10 tokens of a 16-token context: room for 6
    (c,) = engine.generate(ids, dataclasses.replace(GREEDY, max_new_tokens=50))
    assert len(c.token_ids) == 6 and c.finish_reason == "length"
    with pytest.raises(UserError, match="context"):
        engine.generate(TOK.encode("x" * 16), GREEDY)
    with pytest.raises(UserError, match="outside the vocabulary"):
        engine.generate([VOCAB + 3], GREEDY)


def test_end_tokens_stop_and_are_not_part_of_the_reply():
    def rule(seq):  # five letters, then an end token (eos or assistant_end by the first token)
        n_out = len(seq) - 2
        if n_out >= 5:
            return EOS if seq[0] == ord("e") else END
        return ord("p") + n_out

    engine = make_engine(rule)
    for first in ("e", "a"):
        (c,) = engine.generate(TOK.encode(first + "!"), dataclasses.replace(GREEDY, max_new_tokens=30))
        assert c.text == "pqrst" and c.token_ids == list(b"pqrst") and c.finish_reason == "stop"


# --------------------------------------------------------------------------- stop strings

def test_stop_strings_cut_the_text_exactly():
    engine = make_engine()
    ids = TOK.encode("stop here")
    full = text_of(continuation(letters_rule, ids, 20))
    stop = full[7:10]
    cut = full.find(stop)  # the earliest occurrence, which may come before index 7
    (c,) = engine.generate(ids, SamplingParams(max_new_tokens=20, temperature=0, stop=[stop, "never"]))
    assert c.text == full[:cut] and c.finish_reason == "stop"
    assert stop not in c.text
    # decoding stopped at the token that completed the stop string
    assert c.token_ids == list(full[:cut + len(stop)].encode())
    # a stop string that never appears: the reply runs to its length
    (c,) = engine.generate(ids, SamplingParams(max_new_tokens=20, temperature=0, stop=["#"]))
    assert c.text == full and c.finish_reason == "length"


def test_a_stop_string_at_the_very_start_gives_empty_text():
    engine = make_engine()
    ids = TOK.encode("q")
    first = text_of(continuation(letters_rule, ids, 1))
    (c,) = engine.generate(ids, SamplingParams(max_new_tokens=10, temperature=0, stop=[first]))
    assert c.text == "" and c.finish_reason == "stop"


def test_stop_matcher_holds_back_what_could_start_a_stop_string():
    m = StopMatcher(["END", "\n\n"])
    assert m.find("abcEN") == -1 and m.find("abcENDx") == 3
    assert m.find("a\n\nb END") == 1  # the earliest of all stop strings
    assert m.safe_len("abcEN") == 3  # "EN" may become "END"
    assert m.safe_len("abcE") == 3
    assert m.safe_len("abc\n") == 3
    assert m.safe_len("abcx") == 4
    assert m.safe_len("ab\ufffd") == 2  # an unfinished UTF-8 character waits for its other bytes
    assert StopMatcher([""]).stops == []  # an empty stop string is ignored, not a match everywhere


# --------------------------------------------------------------------------- sampling

SAMPLED = SamplingParams(max_new_tokens=16, temperature=1.0, num_return_sequences=4)


def test_seeded_samples_are_reproducible_and_differ_between_seeds():
    ids = TOK.encode("seed")
    a = [c.token_ids for c in make_engine().generate(ids, dataclasses.replace(SAMPLED, seed=1))]
    b = [c.token_ids for c in make_engine().generate(ids, dataclasses.replace(SAMPLED, seed=1))]
    # the same engine, reused, gives the same samples again too
    e = make_engine()
    e.generate(ids, dataclasses.replace(SAMPLED, seed=5))
    c = [c.token_ids for c in e.generate(ids, dataclasses.replace(SAMPLED, seed=1))]
    d = [c.token_ids for c in make_engine().generate(ids, dataclasses.replace(SAMPLED, seed=2))]
    assert len(a) == 4 and a == b == c
    assert a != d
    assert len({tuple(x) for x in a}) == 4  # the n samples of one request are not copies
    greedy = continuation(letters_rule, ids, 16)
    assert all(x != greedy for x in a)  # and they are samples, not the greedy reply


def test_sampling_follows_the_models_distribution():
    """At temperature 1, the rule's token (logit 2 against 25 letters at 0) is drawn with
    probability e^2 / (e^2 + 25) ~ 0.228; far lower temperature makes it nearly certain."""
    ids = TOK.encode("dist")
    engine = make_engine()
    comps = engine.generate(ids, SamplingParams(max_new_tokens=1, temperature=1.0, seed=0, num_return_sequences=400))
    target = letters_rule(ids)
    share = sum(c.token_ids[0] == target for c in comps) / len(comps)
    assert 0.15 < share < 0.31
    assert all(c.token_ids[0] in LETTERS for c in comps)  # -inf logits are never drawn
    comps = engine.generate(ids, SamplingParams(max_new_tokens=1, temperature=0.1, seed=0, num_return_sequences=50))
    assert all(c.token_ids[0] == target for c in comps)


def test_top_k_1_and_temperature_0_are_greedy():
    ids = TOK.encode("greedy?")
    engine = make_engine()
    want = continuation(letters_rule, ids, 16)
    for p in (SamplingParams(max_new_tokens=16, temperature=1.0, top_k=1, seed=3),
              SamplingParams(max_new_tokens=16, temperature=1.5, top_k=1, seed=4, num_return_sequences=3),
              SamplingParams(max_new_tokens=16, temperature=0.0, seed=5),
              SamplingParams(max_new_tokens=16, temperature=0.0, seed=6, top_p=0.5, top_k=3),
              SamplingParams(max_new_tokens=16, temperature=0.0, num_return_sequences=2)):
        for c in engine.generate(ids, p):
            assert c.token_ids == want, p
    # top_p small enough to keep only the most likely token is greedy as well
    (c,) = engine.generate(ids, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.05, seed=9))
    assert c.token_ids == want


def test_top_k_restricts_samples_to_the_k_most_likely():
    class Graded(MockModel):  # no ties: a > b > c > ... > z, nothing else possible
        def logits_for(self, seq):
            row = torch.full((VOCAB,), float("-inf"))
            row[LETTERS] = -torch.arange(26, dtype=torch.float) * 0.1  # a > b > c > ...
            return row

    engine = Engine(Graded(), TOK)
    comps = engine.generate(TOK.encode("k"), SamplingParams(max_new_tokens=1, temperature=1.0, top_k=3, seed=0,
                                                            num_return_sequences=200))
    assert {c.token_ids[0] for c in comps} == set(b"abc")


# --------------------------------------------------------------------------- continuous batching

GREEDY_REQUESTS = [
    ("a", SamplingParams(max_new_tokens=9, temperature=0)),
    ("dddd", SamplingParams(max_new_tokens=11, temperature=0, repetition_penalty=1.3)),
    ("ffff ff", SamplingParams(max_new_tokens=8, temperature=0)),
]
# sampled requests that all filter (top-k / top-p), and ones that all sample from the full softmax
FILTERED = [
    ("bb bb", SamplingParams(max_new_tokens=3, temperature=1.0, top_k=20, seed=11)),
    ("the longest prompt of all", SamplingParams(max_new_tokens=14, temperature=0.7, top_k=5, seed=12)),
    ("cc", SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=13, num_return_sequences=2)),
    ("e", SamplingParams(max_new_tokens=2, temperature=1.2, top_k=8, top_p=0.95, seed=14)),
]
UNFILTERED = [
    ("bb bb", SamplingParams(max_new_tokens=3, temperature=1.0, seed=11)),
    ("the longest prompt of all", SamplingParams(max_new_tokens=14, temperature=0.7, seed=12)),
    ("cc", SamplingParams(max_new_tokens=6, temperature=1.0, seed=13, num_return_sequences=2)),
    ("e", SamplingParams(max_new_tokens=2, temperature=1.2, seed=14, repetition_penalty=1.2)),
]


def interleave(a, b):
    out = []
    for i in range(max(len(a), len(b))):
        out += a[i:i + 1] + b[i:i + 1]
    return out


def solo(prompt, p):
    return [(c.token_ids, c.text, c.finish_reason) for c in make_engine().generate(TOK.encode(prompt), p)]


def batched(requests, max_batch, join_after=None):
    """Run requests through one engine; with join_after=k, all but the first two join after k steps."""
    engine = make_engine(max_batch=max_batch)
    first = requests if join_after is None else requests[:2]
    reqs = [engine.add_request(TOK.encode(prompt), p) for prompt, p in first]
    if join_after is not None:
        for _ in range(join_after):
            engine.step()
        reqs += [engine.add_request(TOK.encode(prompt), p) for prompt, p in requests[2:]]
    engine.run_until_done(reqs)
    assert not engine.has_work() and engine.num_active == 0
    return engine, [[(c.token_ids, c.text, c.finish_reason) for c in r.completions] for r in reqs]


@pytest.mark.parametrize("sampled", [FILTERED, UNFILTERED], ids=["filtered", "unfiltered"])
def test_a_batch_gives_what_each_request_gives_alone(sampled):
    requests = interleave(GREEDY_REQUESTS, sampled)
    want = [solo(prompt, p) for prompt, p in requests]
    # 3 rows for 8 sequences: requests wait, join as rows free up, and finished rows are compacted
    engine, got = batched(requests, max_batch=3)
    assert got == want
    assert max(engine.model.batch_sizes) == 3 and min(engine.model.batch_sizes) < 3
    # requests added while others are running join the batch mid-flight
    engine, got = batched(requests, max_batch=4, join_after=2)
    assert got == want


def test_a_sampled_request_does_not_depend_on_its_neighbours_filters():
    plain = ("bb bb", SamplingParams(max_new_tokens=8, temperature=1.0, seed=11))
    neighbour = ("zz", SamplingParams(max_new_tokens=8, temperature=1.0, seed=12, top_k=5))
    _, got = batched([plain, neighbour], max_batch=2)
    assert got == [solo(*plain), solo(*neighbour)]


def test_generate_many_matches_one_at_a_time_for_greedy():
    prompts = [TOK.encode(p) for p, _ in GREEDY_REQUESTS + FILTERED]
    engine = make_engine()
    p = SamplingParams(max_new_tokens=10, temperature=0)
    many = engine.generate_many(prompts, p, max_batch=2)
    assert [c.token_ids for c in many] == [continuation(letters_rule, ids, 10) for ids in prompts]
    # the same prompt twice with a seed: two different samples (an RL group), reproducible
    s = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)
    a = make_engine().generate_many([prompts[0]] * 2, s)
    b = make_engine().generate_many([prompts[0]] * 2, s)
    assert [c.token_ids for c in a] == [c.token_ids for c in b] and a[0].token_ids != a[1].token_ids


def test_generate_many_n_samples_share_one_prefill_per_prompt():
    """An RL group: n samples of each prompt, consecutive in the result, the prompt prefilled once
    (its cache copied to the n rows), the samples different from each other, reproducible, and with
    temperature 0 each equal to the prompt's greedy reply."""
    prompts = [TOK.encode(p) for p, _ in GREEDY_REQUESTS[:3]]
    engine = make_engine(max_batch=16)
    calls = []
    prefill = engine.model.prefill
    engine.model.prefill = lambda ids, *a, **k: calls.append(ids.shape) or prefill(ids, *a, **k)
    s = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)
    a = engine.generate_many(prompts, s, max_batch=12, n=4)
    assert len(calls) == 3 and len(a) == 12
    for i in range(3):
        group = [tuple(c.token_ids) for c in a[4 * i:4 * i + 4]]
        assert len(set(group)) == 4
    b = make_engine(max_batch=16).generate_many(prompts, s, max_batch=12, n=4)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    g = make_engine().generate_many(prompts, SamplingParams(max_new_tokens=10, temperature=0), max_batch=4, n=2)
    assert [c.token_ids for c in g] == [continuation(letters_rule, ids, 10) for ids in prompts for _ in range(2)]


def test_generate_many_takes_one_setting_per_prompt():
    prompts = [TOK.encode(p) for p, _ in GREEDY_REQUESTS[:3]]
    budgets = [3, 10, 6]
    many = make_engine().generate_many(prompts, [SamplingParams(max_new_tokens=n, temperature=0) for n in budgets],
                                       max_batch=2)
    assert [c.token_ids for c in many] == [continuation(letters_rule, ids, n) for ids, n in zip(prompts, budgets)]
    with pytest.raises(ValueError, match="2 sampling settings for 3 prompts"):
        make_engine().generate_many(prompts, [SamplingParams(max_new_tokens=3)] * 2)


def test_cancelling_a_request_frees_its_rows_and_the_others_continue():
    engine = make_engine(max_batch=3)
    long = SamplingParams(max_new_tokens=30, temperature=0)
    prompts = ["one", "two", "three", "four"]
    reqs = [engine.add_request(TOK.encode(p), long) for p in prompts]
    engine.step()
    assert engine.num_active == 3 and list(engine.waiting) == [reqs[3]]  # the fourth waits for a row
    engine.step()
    engine.cancel(reqs[0])
    assert engine.num_active == 2
    assert reqs[0].finished and reqs[0].completions[0].finish_reason == "cancelled"
    partial = reqs[0].completions[0].token_ids
    assert 0 < len(partial) < 30 and partial == continuation(letters_rule, TOK.encode("one"), len(partial))
    engine.step()  # the freed row goes to the waiting request
    assert engine.num_active == 3 and not engine.waiting
    engine.cancel(reqs[0])  # cancelling twice is harmless
    engine.run_until_done(reqs[1:])
    for prompt, r in zip(prompts[1:], reqs[1:]):
        assert r.completions[0].token_ids == continuation(letters_rule, TOK.encode(prompt), 30)
    assert engine.num_active == 0
    # a request cancelled while waiting never runs
    engine = make_engine(max_batch=1)
    a = engine.add_request(TOK.encode("a"), long)
    b = engine.add_request(TOK.encode("b"), long)
    engine.step()
    engine.cancel(b)
    assert b.completions[0].token_ids == [] and b.completions[0].finish_reason == "cancelled"
    engine.run_until_done([a])
    assert a.completions[0].token_ids == continuation(letters_rule, TOK.encode("a"), 30)


def test_stopping_one_sample_frees_its_row_and_the_other_samples_continue():
    engine = make_engine(max_batch=4)
    p = SamplingParams(max_new_tokens=30, temperature=1.0, seed=4, num_return_sequences=3)
    want = engine.generate(TOK.encode("abc"), p)
    req = engine.add_request(TOK.encode("abc"), p)
    other = engine.add_request(TOK.encode("xyz"), SamplingParams(max_new_tokens=30, temperature=0))
    engine.step()
    engine.step()
    assert engine.num_active == 4
    engine.stop_seq(req, 1, "content_filter")
    assert engine.num_active == 3 and not req.finished  # only that sample's row was freed
    engine.stop_seq(req, 1, "content_filter")  # twice is harmless
    engine.run_until_done([req, other])
    got = req.completions
    assert got[1].finish_reason == "content_filter" and 0 < len(got[1].token_ids) < 30
    assert got[1].token_ids == want[1].token_ids[:len(got[1].token_ids)]
    # the other samples and the other request decode exactly as they would have, to the end
    assert [c.token_ids for c in (got[0], got[2])] == [want[0].token_ids, want[2].token_ids]
    assert other.completions[0].token_ids == continuation(letters_rule, TOK.encode("xyz"), 30)
    assert engine.num_active == 0
    # stopping every sample completes the request; a sample stopped while waiting never decodes
    req = engine.add_request(TOK.encode("abc"), dataclasses.replace(p, num_return_sequences=2))
    engine.step()
    engine.stop_seq(req, 0)
    engine.stop_seq(req, 1)
    assert req.finished and engine.num_active == 0 and not engine.has_work()
    engine = make_engine(max_batch=2)
    busy = engine.add_request(TOK.encode("q"), SamplingParams(max_new_tokens=5, temperature=0, num_return_sequences=2))
    waiting = engine.add_request(TOK.encode("abc"), p)
    engine.step()
    engine.stop_seq(waiting, 0, "content_filter")
    engine.run_until_done([busy, waiting])
    assert waiting.completions[0].token_ids == [] and waiting.completions[0].finish_reason == "content_filter"
    assert [c.token_ids for c in waiting.completions[1:]] == [c.token_ids for c in want[1:]]
    engine.stop_seq(waiting, 2)  # after the end: nothing happens
    assert waiting.completions[2].finish_reason == "length"


# --------------------------------------------------------------------------- streaming and UTF-8

UTF8 = "héllo, 你好 😀 ok\n".encode()  # 1-, 2-, 3- and 4-byte characters


def utf8_rule(seq):
    """The next byte of UTF8, cycling, by how many tokens were generated (the prompt is 2 tokens)."""
    return UTF8[(len(seq) - 2) % len(UTF8)]


def test_streaming_joins_to_the_final_text_and_never_splits_a_character():
    engine = make_engine(utf8_rule)
    n = 2 * len(UTF8) + 5
    chunks = list(engine.stream(TOK.encode("go"), SamplingParams(max_new_tokens=n, temperature=0)))
    (c,) = engine.last
    want = (UTF8 * 3)[:n].decode("utf-8", errors="replace")
    assert c.text == want and c.finish_reason == "length"
    assert "".join(t for _, t in chunks) == c.text
    assert all(i == 0 for i, _ in chunks)
    # every chunk is whole characters: none carries a replacement character or a lone piece of one
    assert all(t and "\ufffd" not in t for _, t in chunks)
    assert len(chunks) > 10  # it streamed, rather than sending everything at the end
    assert any("你" in t or "😀" in t for _, t in chunks)


def test_streaming_with_a_stop_string_never_shows_the_stop_string():
    engine = make_engine(utf8_rule)
    p = SamplingParams(max_new_tokens=100, temperature=0, stop=["你好"])
    chunks = [t for _, t in engine.stream(TOK.encode("go"), p)]
    assert "".join(chunks) == engine.last[0].text == "héllo, "
    assert engine.last[0].finish_reason == "stop"
    # a stop string that begins like the text but differs: the held-back text is released
    chunks = [t for _, t in engine.stream(TOK.encode("go"), SamplingParams(max_new_tokens=60, temperature=0,
                                                                          stop=["héllo!"]))]
    assert "".join(chunks) == engine.last[0].text == (UTF8 * 3)[:60].decode("utf-8", errors="replace")


def test_closing_a_stream_early_cancels_it():
    engine = make_engine()
    gen = engine.stream(TOK.encode("close"), SamplingParams(max_new_tokens=40, temperature=0))
    next(gen)
    next(gen)
    assert engine.num_active == 1
    gen.close()
    assert engine.num_active == 0 and not engine.has_work()


def test_detokenizer_commits_only_whole_characters():
    d = Detokenizer(TOK)
    pieces = [d.push(b) for b in "a你😀b".encode()]
    # "a", then 你's three bytes (two held, then the character), then 😀's four, then "b"
    assert pieces == ["a", "", "", "你", "", "", "", "😀", "b"]
    assert d.text == "a你😀b" and d.flush() == ""
    # an unfinished character at the end comes out on flush (as the replacement character)
    d = Detokenizer(TOK)
    assert d.push(0xE4) == "" and d.flush() == "\ufffd"


# --------------------------------------------------------------------------- process_logits

def test_process_logits_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    same = process_logits(logits, SamplingParams(temperature=1.0), None)
    assert torch.equal(same, logits)
    hot = process_logits(logits, SamplingParams(temperature=2.0), None)
    assert torch.allclose(hot, logits / 2)
    k2 = process_logits(logits, SamplingParams(temperature=1.0, top_k=2), None)
    assert torch.isinf(k2[0, [0, 3]]).all() and torch.equal(k2[0, [1, 2]], logits[0, [1, 2]])
    # top_p: keep the smallest set of most likely tokens whose mass reaches p
    probs = logits.softmax(-1)[0]  # ~[0.087, 0.644, 0.237, 0.032]
    p1 = process_logits(logits, SamplingParams(temperature=1.0, top_p=0.5), None)
    assert torch.isfinite(p1[0]).tolist() == [False, True, False, False]
    p2 = process_logits(logits, SamplingParams(temperature=1.0, top_p=float(probs[1] + 0.01)), None)
    assert torch.isfinite(p2[0]).tolist() == [False, True, True, False]
    # repetition penalty (CTRL): seen positive logits divided, seen negative ones multiplied
    neg = torch.tensor([[2.0, -1.0, 4.0]])
    pen = process_logits(neg, SamplingParams(temperature=1.0, repetition_penalty=2.0), torch.tensor([[0, 1]]))
    assert pen.tolist() == [[1.0, -2.0, 4.0]]


def test_repetition_penalty_changes_greedy_output_in_the_engine():
    def rule(seq):  # always the same letter
        return ord("z")

    class TwoChoice(MockModel):
        def logits_for(self, seq):
            row = torch.full((VOCAB,), float("-inf"))
            row[ord("z")], row[ord("y")] = 2.0, 1.5
            return row

    engine = Engine(TwoChoice(rule), TOK)
    (c,) = engine.generate(TOK.encode("a"), SamplingParams(max_new_tokens=3, temperature=0))
    assert c.text == "zzz"
    # after one z its logit 2 / 1.5 = 1.33 drops below y's 1.5; then both are penalised alike
    (c,) = engine.generate(TOK.encode("a"), SamplingParams(max_new_tokens=3, temperature=0, repetition_penalty=1.5))
    assert c.text == "zyz"


def test_invalid_sampling_params_are_user_errors():
    engine = make_engine()
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1),
                dict(repetition_penalty=0), dict(num_return_sequences=0)):
        with pytest.raises(UserError):
            engine.generate(TOK.encode("x"), SamplingParams(**bad))
    with pytest.raises(UserError, match="empty"):
        engine.generate([], GREEDY)
