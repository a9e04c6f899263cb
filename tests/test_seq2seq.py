"""The seq2seq family: logits parity with transformers' MarianMTModel (export and import), the KV
cache against teacher forcing, beam search against exhaustive search, batching, and learning a
tiny synthetic language (reversal) on the one trainer."""

import itertools
import math
import random

import pytest
import torch

from chatsmith.checkpoint import load_model, save_checkpoint
from chatsmith.config import TrainConfig
from chatsmith.engine import SamplingParams
from chatsmith.model import registry
from chatsmith.seq2seq_engine import Seq2SeqEngine
from chatsmith.train.trainer import Trainer
from chatsmith.train.translate import TranslationStage

PAD, EOS = 0, 1


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, one thread


class IdTokenizer:
    """Texts are ids written as numbers: enough for the engine (vocab_size, encode, decode)."""

    def __init__(self, n):
        self.vocab_size = n

    def encode(self, text):
        return [int(x) for x in text.split()]

    def decode(self, ids, skip_special=False):
        return " ".join(map(str, ids))


def _model(seed=0, vocab=101, **kw):
    torch.manual_seed(seed)
    cfg = registry.preset("micro", family="transformer", vocab_size=vocab, pad_token_id=PAD, eos_token_id=EOS, **kw)
    m = registry.build(cfg).eval()
    with torch.no_grad():  # away from the init so that every tensor matters
        m.final_logits_bias.normal_(std=0.5)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def _inputs(vocab=101):
    g = torch.Generator().manual_seed(1)
    src = torch.randint(2, vocab, (3, 9), generator=g)
    src[1, 6:] = PAD
    src[2, 3:] = PAD
    tgt = torch.randint(2, vocab, (3, 7), generator=g)
    tgt[:, 0] = PAD  # the decoder start
    return src, (src != PAD).long(), tgt


@pytest.mark.parametrize("activation", ["relu", "swish"])
def test_export_matches_marian_logits(tmp_path, activation):
    transformers = pytest.importorskip("transformers")
    m = _model(activation=activation)
    save_checkpoint(tmp_path / "m", m)
    hf, info = transformers.MarianMTModel.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    src, mask, tgt = _inputs()
    with torch.no_grad():
        ours = m(src, tgt, mask)
        theirs = hf.eval()(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (load_model(tmp_path / "m")(src, tgt, mask) - ours).abs().max().item() == 0


def test_import_from_marian(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MarianConfig(vocab_size=101, d_model=32, encoder_layers=2, decoder_layers=1,
                                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                    decoder_ffn_dim=48, max_position_embeddings=64, pad_token_id=PAD,
                                    eos_token_id=EOS, decoder_start_token_id=PAD, activation_function="swish",
                                    scale_embedding=True)
    torch.manual_seed(3)
    hf = transformers.MarianMTModel(cfg).eval()
    with torch.no_grad():
        hf.final_logits_bias.normal_()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert ours.cfg.n_decoder_layer == 1 and ours.cfg.d_ff == 48
    src, mask, tgt = _inputs()
    with torch.no_grad():
        want = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    assert (ours(src, tgt, mask) - want).abs().max().item() <= 1e-4


def test_cached_decoding_matches_teacher_forcing():
    m = _model()
    src, mask, tgt = _inputs()
    with torch.no_grad():
        full = m(src, tgt, mask)
        enc, keep = m.encode(src, mask)
        cache = m.new_cache(enc, keep)
        steps = [m.decode(tgt[:, :2], cache)]  # a chunk first, then one token at a time
        steps += [m.decode(tgt[:, t:t + 1], cache) for t in range(2, tgt.shape[1])]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def _exhaustive(engine, src, n_real, max_len):
    """Every hypothesis decoding can produce within max_len tokens, scored by the model."""
    alphabet = [t for t in range(n_real) if t not in (PAD, EOS)]
    out = []
    for n in range(max_len + 1):
        for seq in itertools.product(alphabet, repeat=n):
            if n < max_len:  # ended by EOS
                out.append((engine.score(src, list(seq)), list(seq)))
            else:  # cut at the budget: no EOS
                ids = list(seq)
                lp = engine.score(src, ids) - _eos_logp(engine, src, ids)
                out.append((lp, ids))
    return sorted(out, key=lambda x: -x[0])


def _eos_logp(engine, src, ids):
    enc, keep = engine._encode([src])
    x = torch.tensor([[PAD] + ids])
    with torch.no_grad():
        lp = engine._logp(engine.model.decode(x, engine.model.new_cache(enc, keep))[0]).log_softmax(-1)
    return float(lp[-1, EOS])


def test_beam_search_equals_exhaustive_search():
    m = _model(seed=5, vocab=8)
    engine = Seq2SeqEngine(m, IdTokenizer(6))  # ids 6, 7: padding rows of the vocabulary, never produced
    srcs = [[2, 3, 4, EOS], [5, 5, EOS]]
    p = SamplingParams(max_new_tokens=3, num_beams=64, num_return_sequences=5, length_penalty=0.0)
    got = engine.generate_ids(srcs, p)
    for src, comps in zip(srcs, got):
        best = _exhaustive(engine, src, 6, 3)[:5]
        assert [c.token_ids for c in comps] == [s for _, s in best]
        assert [c.score for c in comps] == pytest.approx([lp for lp, _ in best], abs=1e-4)
    # greedy: the argmax path (a narrow beam may differ, the exhaustive best is not required of it)
    greedy = engine.generate_ids(srcs, SamplingParams(max_new_tokens=3, temperature=0.0))
    for src, (c,) in zip(srcs, greedy):
        assert c.score == pytest.approx(engine.score(src, c.token_ids) if c.finish_reason == "stop"
                                        else engine.score(src, c.token_ids) - _eos_logp(engine, src, c.token_ids),
                                        abs=1e-4)


@pytest.mark.parametrize("beams", [1, 3])
def test_batched_decoding_equals_one_at_a_time(beams):
    m = _model(seed=2, vocab=40)
    engine = Seq2SeqEngine(m, IdTokenizer(40), max_batch=8)
    rng = random.Random(0)
    srcs = [[rng.randrange(2, 40) for _ in range(rng.randint(1, 9))] + [EOS] for _ in range(6)]
    p = SamplingParams(max_new_tokens=8, temperature=0.0, num_beams=beams, num_return_sequences=beams)
    batched = engine.generate_ids(srcs, p)
    single = [engine.generate_ids([s], p)[0] for s in srcs]
    assert [[c.token_ids for c in cs] for cs in batched] == [[c.token_ids for c in cs] for cs in single]


def test_learns_to_reverse_a_tiny_language(tmp_path):
    V = 12
    rng = random.Random(0)

    def pair():
        s = [rng.randrange(2, V) for _ in range(rng.randint(2, 6))]
        return (s + [EOS], s[::-1] + [EOS])

    rows, held = [pair() for _ in range(3000)], [pair() for _ in range(40)]
    torch.manual_seed(0)
    cfg = registry.preset("micro", family="seq2seq", vocab_size=V, pad_token_id=PAD, eos_token_id=EOS,
                          max_seq_len=16)
    model = registry.build(cfg)
    tc = TrainConfig(out=str(tmp_path / "run"), max_steps=450, batch_size=32, lr=2e-3, warmup_steps=30,
                     min_lr_ratio=0.1, beta2=0.98, weight_decay=0.0, eval_every=1000, save_every=1000,
                     log_every=1000, device="cpu")
    stage = TranslationStage(rows, held[:8], tc, PAD, PAD, label_smoothing=0.1)
    before = stage.evaluate(model.eval())["val_token_acc"]
    model.train()
    Trainer(model, stage, tc).fit()
    engine = Seq2SeqEngine(model, IdTokenizer(V))
    outs = engine.generate_ids([s for s, _ in held], SamplingParams(max_new_tokens=10, temperature=0.0))
    exact = sum(o[0].token_ids == t[:-1] for o, (_, t) in zip(outs, held)) / len(held)
    assert before < 0.3 and exact >= 0.9, (before, exact)


def test_length_buckets_cover_each_pair_once_and_pad_less():
    rng = random.Random(0)
    lens = [rng.randint(4, 60) for _ in range(32 * 16)]  # a translation about as long as its source
    rows = [([2] * n, [3] * max(1, n + rng.randint(-3, 3))) for n in lens]
    tc = TrainConfig(batch_size=32, seed=3)
    stage = TranslationStage(rows, [], tc, PAD, PAD)
    batches = [stage.batch_rows(i) for i in range(16)]
    assert sorted(j for b in batches for j in b) == list(range(len(rows)))  # one epoch: every pair once
    assert batches == [stage.batch_rows(i) for i in range(16)]  # a pure function of the index
    def cost(b):  # what a padded batch computes on: both sides at their longest
        return len(b) * (max(len(rows[j][0]) for j in b) + max(len(rows[j][1]) for j in b))
    assert sum(map(cost, batches)) < 0.8 * sum(cost(range(i * 32, i * 32 + 32)) for i in range(16))


def test_sampling_is_seeded_and_returns_n_per_source():
    m = _model(seed=4, vocab=30)
    engine = Seq2SeqEngine(m, IdTokenizer(30))
    srcs = [[2, 3, EOS], [4, 5, 6, 7, EOS]]
    p = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, repetition_penalty=1.3, seed=7,
                       num_return_sequences=3)
    a = engine.generate_ids(srcs, p)
    assert [len(x) for x in a] == [3, 3]
    assert [[c.token_ids for c in x] for x in a] == [[c.token_ids for c in x] for x in engine.generate_ids(srcs, p)]
    assert all(t not in (PAD,) and t < 30 for x in a for c in x for t in c.token_ids)
