"""The metrics themselves against hand computation: whole-document loss / perplexity /
bits-per-byte (with overlapping windows), SFT's assistant-token loss, and the held-out chat
metrics (end-token share, exact match per family)."""

import math

import pytest
import torch
import torch.nn as nn

from chatsmith.eval.lm import score_documents

TABLE = [[0.0, 0.0, 1.0, 2.0, 0.5],  # row = current token, column = next token's logit
         [0.0, 0.0, 0.0, 0.0, 0.0],
         [0.0, -1.0, 0.3, 2.0, 1.0],
         [0.0, 0.0, 1.5, -0.5, 0.2],
         [0.0, 0.5, 0.1, 0.1, 3.0]]
LP = [[v - math.log(sum(math.exp(u) for u in row)) for v in row] for row in TABLE]


class Bigram(nn.Module):
    """Next-token logits depend on the current token only, so a token's log-probability is the
    same in every window that contains it: the sum over a document is computable by hand."""

    def __init__(self, ctx):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(TABLE))
        self.cfg = type("Cfg", (), {"max_seq_len": ctx})()

    def forward(self, x, targets=None, loss_mask=None):
        logits = self.table[x]
        if targets is None:
            return logits
        raise NotImplementedError


class CharTok:
    """'a' 'b' 'c' -> 2 3 4; <|bos|> 0, <|pad|> 1."""
    bos_id, pad_id = 0, 1

    def encode(self, text):
        return [2 + "abc".index(c) for c in text]


def test_document_loss_perplexity_and_bits_per_byte_by_hand():
    docs = ["abcab", "cc", "bacbbcaacb"]  # the last is longer than the 4-token context: 3 windows
    got = score_documents(Bigram(ctx=4), CharTok(), docs, batch_windows=2)
    nats, n = 0.0, 0
    for d in docs:
        ids = [0] + CharTok().encode(d)
        for a, b in zip(ids, ids[1:]):  # every real token predicted exactly once, from <|bos|> on
            nats -= LP[a][b]
            n += 1
    n_bytes = sum(len(d) for d in docs)
    assert got["tokens"] == n == 17 and got["bytes"] == n_bytes == 17
    assert got["loss"] == pytest.approx(nats / n, abs=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(nats / n), rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(nats / (math.log(2) * n_bytes), abs=1e-6)
    # multi-byte characters count their UTF-8 bytes: bits-per-byte is per byte, not per character
    class Wide(CharTok):
        def encode(self, text):
            return [2 + "aéc".index(c) for c in text]

    wide = score_documents(Bigram(ctx=4), Wide(), ["aé"])
    assert wide["bytes"] == 3 and wide["bits_per_byte"] == pytest.approx(
        -(LP[0][2] + LP[2][3]) / (math.log(2) * 3), abs=1e-6)


def test_assistant_loss_counts_masked_tokens_only():
    from chatsmith.eval.chat import assistant_loss

    # (ids, mask): the mask marks the tokens that are learnt (targets), as render_chat returns it
    ex = [([0, 2, 3, 4, 4], [0, 0, 0, 1, 1]), ([0, 3, 2], [0, 1, 1]), ([0, 4, 2, 3, 2, 2], [0, 0, 1, 0, 1, 0])]
    got = assistant_loss(Bigram(ctx=8), ex, pad_id=1, batch_size=2)
    nats, n = 0.0, 0
    for ids, mask in ex:
        for t in range(1, len(ids)):
            if mask[t]:
                nats -= LP[ids[t - 1]][ids[t]]
                n += 1
    assert n == 6 and got == pytest.approx(nats / n, abs=1e-6)


def test_chat_metrics_end_share_and_exact_match_per_family(base_model, tokenizer_dir, monkeypatch):
    from chatsmith.checkpoint import load_model
    from chatsmith.data.chat_formats import Record
    from chatsmith.engine import Completion, Engine
    from chatsmith.eval.chat import chat_metrics
    from chatsmith.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)

    def rec(q, a, fam, answers=None):
        return Record([{"role": "user", "content": q}, {"role": "assistant", "content": a}], "t:1",
                      {"family": fam, **({"answers": answers} if answers else {})})

    records = [rec("What is 2 + 3?", "5", "arithmetic", ["5"]), rec("What is 4 + 4?", "8", "arithmetic", ["8"]),
               rec("What is 9 - 1?", "8", "arithmetic", ["8"]), rec("Capital of Peru?", "Lima", "quiz", ["Lima"]),
               rec("Hello", "Hi there", "chatterbot")]
    replies = {"2 + 3": ("The answer is 5.", "stop"), "4 + 4": ("9", "stop"), "9 - 1": ("8", "length"),
               "Peru": ("lima", "stop"), "Hello": ("Hi", "length")}

    budgets = {}

    def fake(self, prompts, p, max_batch=32):
        out = []
        for ids, q in zip(prompts, p):
            budgets[tok.decode(ids)] = (len(ids), q.max_new_tokens)
            text = tok.decode(ids)
            reply, why = next(v for k, v in replies.items() if k in text)
            out.append(Completion(tok.encode(reply), reply, why))
        return out

    monkeypatch.setattr(Engine, "generate_many", fake)
    m = chat_metrics(load_model(base_model), tok, records, per_family=10, pad_id=tok.pad_id)
    assert m["generated"] == 5
    assert m["ended_share"] == pytest.approx(3 / 5)
    assert m["ended_by_family"] == {"arithmetic": pytest.approx(2 / 3), "chatterbot": 0.0, "quiz": 1.0}
    # "ended" is judged within twice the reference reply, never less than max_new_tokens (48) unless
    # the context (64 tokens for micro) ends first
    model = load_model(base_model)
    ctx = model.cfg.max_seq_len
    assert max(n for _, n in budgets.values()) == 48 and all(k + n <= ctx for k, n in budgets.values())
    budgets.clear()
    replies["Recite"] = ("a poem", "stop")
    chat_metrics(model, tok, [rec("Recite a poem", "word " * 40, "poem")], pad_id=tok.pad_id)
    ((k, got),) = budgets.values()
    assert got == ctx - k > 48  # the long reference raised the budget to the context
    assert m["exact_match"] == {"arithmetic": pytest.approx(2 / 3), "quiz": 1.0}  # no answers: no accuracy
    assert m["assistant_loss"] > 0
