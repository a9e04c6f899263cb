"""Continuous batching: the slot KV cache, batched decoding equal to one-at-a-time decoding, requests
joining and leaving between steps, cancellation, logprobs, incremental detokenization."""

import pytest
import torch

from chatsmith.checkpoint import load_model
from chatsmith.engine import Detokenizer, Engine, SamplingParams
from chatsmith.model.decoder import GPT
from chatsmith.model.registry import preset
from chatsmith.tokenizer import Tokenizer
from test_engine_unit import BOS, END, EOS, VOCAB, ByteTokenizer


@pytest.fixture(scope="module")
def engine(base_model):
    return Engine(load_model(base_model), Tokenizer.load(base_model), max_batch=8)


def prompts(engine):
    texts = ["The king said", "In 1805 there were", "Love", "she was the queen of the river and the sea",
             "春眠不觉晓", "A", "The night", "war and peace and time and the world"]
    return [engine.tok.encode(t, bos=True) for t in texts]


@pytest.mark.parametrize("arch,kw,fast", [("llama", dict(n_kv_head=2), False), ("llama", dict(n_kv_head=2), True),
                                          ("llama", {}, True), ("gpt2", {}, False)])
def test_decode_step_matches_full_forward(arch, kw, fast):
    """Rows at different lengths decoded in one pass give the logits of a full uncached forward,
    through the modules and through the fused fast path."""
    torch.manual_seed(0)
    m = GPT(preset("micro", arch=arch, vocab_size=97, **kw)).eval()
    fused = m.fuse_decode_weights() if fast else None
    assert (fused is not None) == fast or arch == "gpt2"
    ps = [torch.randint(0, 97, (n,)).tolist() for n in (5, 17, 2)]
    cont = [torch.randint(0, 97, (4,)).tolist() for _ in ps]
    cache = m.new_slot_cache(4, 64)
    with torch.no_grad():
        cache.k[0].fill_(1e4)  # stale garbage from an earlier occupant must be masked out
        for r, p in enumerate(ps):
            m(torch.tensor([p]), cache=cache.row_view(r))
            cache.lens[r] = len(p)
        for t in range(4):
            logits = m.decode_step(torch.tensor([c[t] for c in cont]), cache, fused=fused)
            for r in range(3):
                ref = m(torch.tensor([ps[r] + cont[r][:t + 1]]))[0, -1]
                torch.testing.assert_close(logits[r], ref, atol=1e-5, rtol=1e-5)
        assert cache.lens[:3].tolist() == [9, 21, 6]


@pytest.mark.parametrize("n_kv_head", [2, 4])
def test_single_row_fast_decode_matches_full_forward(n_kv_head):
    """One row takes the fast path's unmasked branch (slice writes, no attention mask): same
    logits as a full forward, with a longer previous occupant's keys left in the slot beyond it."""
    torch.manual_seed(1)
    m = GPT(preset("micro", vocab_size=97, n_kv_head=n_kv_head)).eval()
    fused = m.fuse_decode_weights()
    prompt, cont = torch.randint(0, 97, (6,)).tolist(), torch.randint(0, 97, (5,)).tolist()
    cache = m.new_slot_cache(2, 64)
    with torch.no_grad():
        for t in (*cache.k, *cache.v):
            t.fill_(1e4)  # stale keys and values everywhere past what the row writes
        m(torch.tensor([prompt]), cache=cache.row_view(0))
        cache.lens[0] = len(prompt)
        for t in range(5):
            logits = m.decode_step(torch.tensor([cont[t]]), cache, fused=fused)
            ref = m(torch.tensor([prompt + cont[:t + 1]]))[0, -1]
            torch.testing.assert_close(logits[0], ref, atol=1e-5, rtol=1e-5)
    assert int(cache.lens[0]) == 11


@pytest.mark.parametrize("arch,kw,fast", [("llama", dict(n_kv_head=2), True), ("llama", {}, True),
                                          ("llama", dict(n_kv_head=2), False), ("gpt2", {}, False)])
def test_prefill_matches_full_forward_and_fills_the_cache(arch, kw, fast):
    """prefill on the fused weights (or through the modules) gives a full forward's logits, at the
    last position or at every one, and leaves in its slot the keys a decode step then attends to."""
    torch.manual_seed(2)
    m = GPT(preset("micro", arch=arch, vocab_size=97, **kw)).eval()
    fused = m.fuse_decode_weights() if fast else None
    prompt, cont = torch.randint(0, 97, (9,)), torch.randint(0, 97, (3,)).tolist()
    cache = m.new_slot_cache(3, 64)
    with torch.no_grad():
        for t in (*cache.k, *cache.v):
            t.fill_(1e4)  # an earlier occupant's keys, longer than this prompt
        ref = m(prompt[None])[0]
        every = m.prefill(prompt, cache, 1, fused, every_position=True)
        torch.testing.assert_close(every, ref, atol=1e-5, rtol=1e-5)
        last = m.prefill(prompt, cache, 1, fused)
        torch.testing.assert_close(last, ref[-1:], atol=1e-5, rtol=1e-5)
        assert int(cache.lens[1]) == 9
        # the slot holds what a module-path prefill writes: decoding from it gives the full forward
        cache.lens[0] = 0
        for t, tok in enumerate(cont):
            # row 1 decodes alongside an empty row 0, as in the server when a slot is free
            logits = m.decode_step(torch.tensor([0, tok]), cache, fused=fused)
            full = m(torch.cat([prompt, torch.tensor(cont[:t + 1])])[None])[0, -1]
            torch.testing.assert_close(logits[1], full, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="KV cache full"):
            m.prefill(torch.zeros(65, dtype=torch.long), cache, 0, fused)


def test_batched_greedy_equals_one_at_a_time(engine):
    ps = prompts(engine)
    p = SamplingParams(max_new_tokens=24, temperature=0)
    solo = [engine.generate(ids, p)[0] for ids in ps]
    # 3 rows for 8 prompts: rows free up at different steps and the next prompt joins mid-batch
    for max_batch in (3, 8):
        many = engine.generate_many(ps, p, max_batch=max_batch)
        assert [c.token_ids for c in many] == [c.token_ids for c in solo]
        assert [c.text for c in many] == [c.text for c in solo]
        assert [c.finish_reason for c in many] == [c.finish_reason for c in solo]
    assert engine.num_active == 0


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    ps = prompts(engine)
    p = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=40, seed=5)
    a = engine.generate_many(ps, p, max_batch=8)
    b = engine.generate_many(ps, p, max_batch=2)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    # the same prompt twice in one call gets two different samples (RL groups rely on this)
    twice = engine.generate_many([ps[0]] * 4, SamplingParams(max_new_tokens=16, temperature=1.0, seed=5))
    assert len({tuple(c.token_ids) for c in twice}) > 1


def test_requests_join_leave_and_cancel_between_steps(engine):
    ps = prompts(engine)
    greedy = SamplingParams(max_new_tokens=30, temperature=0)
    solo = {i: engine.generate(ps[i], greedy)[0].token_ids for i in (0, 1, 3)}
    a = engine.add_request(ps[0], greedy)
    b = engine.add_request(ps[1], SamplingParams(max_new_tokens=30, temperature=0, num_return_sequences=2))
    for _ in range(3):
        engine.step()
    assert engine.num_active == 3
    c = engine.add_request(ps[3], greedy)  # joins a running batch, at a different length
    engine.step()
    assert engine.num_active == 4 and not a.finished
    engine.cancel(a)  # frees its row immediately, not at the end of its generation
    assert engine.num_active == 3 and a.finished and a.completions[0].finish_reason == "cancelled"
    while not (b.finished and c.finished):
        engine.step()
    assert engine.num_active == 0 and not engine.waiting
    assert b.completions[0].token_ids == b.completions[1].token_ids == solo[1]
    assert c.completions[0].token_ids == solo[3]
    # a closed stream cancels its request too
    it = engine.stream(ps[0], greedy)
    next(it)
    assert engine.num_active == 1
    it.close()
    assert engine.num_active == 0


def test_logprobs_and_prompt_scoring(engine):
    ids = prompts(engine)[0]
    c = engine.generate(ids, SamplingParams(max_new_tokens=6, temperature=0, logprobs=3))[0]
    assert len(c.logprobs) == len(c.token_ids)
    seq = ids + c.token_ids
    with torch.no_grad():
        ref = engine.model(torch.tensor([seq]))[0].float().log_softmax(-1)
    for j, (t, lp, alts) in enumerate(c.logprobs):
        assert t == c.token_ids[j] and lp == pytest.approx(float(ref[len(ids) - 1 + j, t]), abs=1e-4)
        assert len(alts) == 3 and alts[0][0] == t  # greedy: the chosen token is the most likely
    s = engine.generate(seq, SamplingParams(max_new_tokens=0, prompt_logprobs=2))[0]
    assert s.token_ids == [] and s.prompt_logprobs[0] is None and len(s.prompt_logprobs) == len(seq)
    for j in range(1, len(seq)):
        assert s.prompt_logprobs[j][1] == pytest.approx(float(ref[j - 1, seq[j]]), abs=1e-4)


def test_incremental_detokenizer_matches_full_decode(engine):
    tok = engine.tok
    text = "春眠不觉晓，处处闻啼鸟。 The king said: 你好 ok"
    ids = tok.encode(text)
    d = Detokenizer(tok)
    pieces = [d.push(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + d.flush() == tok.decode(ids) == text


def test_fast_path_only_for_plain_modules():
    """A projection wrapped in anything but LoRA, or the GPT-2 shape, goes through the modules."""
    m = GPT(preset("micro", vocab_size=97))
    assert m.fuse_decode_weights() is not None
    assert GPT(preset("micro", arch="gpt2", vocab_size=97)).fuse_decode_weights() is None

    class Wrapped(torch.nn.Linear):
        pass

    q = m.model.layers[1].self_attn.q_proj
    m.model.layers[1].self_attn.q_proj = Wrapped(q.in_features, q.out_features, bias=False)
    assert m.fuse_decode_weights() is None


def test_lora_model_decodes_on_the_fast_path_with_its_update_merged():
    """RL and LoRA SFT decode with adapters attached: the fused snapshot merges W0 + (alpha/r) B A
    and folds the RMSNorm weights into the next matrix, and gives the logits of a full forward."""
    from chatsmith.model.lora import apply_lora

    torch.manual_seed(2)
    m = GPT(preset("micro", vocab_size=97, n_kv_head=2))
    apply_lora(m, 4, 8.0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name or "norm" in name:  # a trained adapter, trained norms
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    m.eval()
    fused = m.fuse_decode_weights()
    assert fused is not None
    prompt, cont = torch.randint(0, 97, (7,)).tolist(), torch.randint(0, 97, (4,)).tolist()
    for rows in (1, 2):  # the single-row branch and the masked batch branch
        cache = m.new_slot_cache(rows, 64)
        with torch.no_grad():
            for r in range(rows):
                m(torch.tensor([prompt]), cache=cache.row_view(r))
                cache.lens[r] = len(prompt)
            for t in range(4):
                logits = m.decode_step(torch.tensor([cont[t]] * rows), cache, fused=fused)
                ref = m(torch.tensor([prompt + cont[:t + 1]]))[0, -1]
                for r in range(rows):
                    torch.testing.assert_close(logits[r], ref, atol=1e-5, rtol=1e-5)


def test_engine_uses_weights_changed_between_calls(engine):
    """RL trains between generate calls: the fused snapshot must follow the new weights."""
    ids = prompts(engine)[0]
    p = SamplingParams(max_new_tokens=8, temperature=0)
    before = engine.generate(ids, p)[0].token_ids
    w = engine.model.lm_head.weight
    with torch.no_grad():
        saved = w.clone()
        w.mul_(-1.0)  # a very different model
        flipped = engine.generate(ids, p)[0].token_ids
        ref = [int(engine.model(torch.tensor([ids]))[0, -1].argmax())]
        w.copy_(saved)
    assert flipped[0] == ref[0] and flipped != before
    assert engine.generate(ids, p)[0].token_ids == before


@pytest.mark.parametrize("fast", [False, True])
def test_a_cache_that_grows_mid_decode_gives_the_same_logits(fast):
    """Growing the slot cache (more rows, more positions) while rows are decoding keeps every
    row's keys and values: the logits equal those of a cache allocated at full size up front."""
    torch.manual_seed(0)
    m = GPT(preset("micro", vocab_size=97, n_kv_head=2)).eval()
    fused = m.fuse_decode_weights() if fast else None
    ps = [torch.randint(0, 97, (n,)).tolist() for n in (5, 11)]
    cont = [torch.randint(0, 97, (12,)).tolist() for _ in ps]
    small, full = m.new_slot_cache(2, 12), m.new_slot_cache(8, 64)
    with torch.no_grad():
        for cache in (small, full):
            for r, p in enumerate(ps):
                m(torch.tensor([p]), cache=cache.row_view(r))
                cache.lens[r] = len(p)
        for t in range(12):
            if small.lens[:2].max() + 1 > small.max_len:
                small.grow(5, small.max_len + 3)
            a = m.decode_step(torch.tensor([c[t] for c in cont]), small, fused=fused)
            b = m.decode_step(torch.tensor([c[t] for c in cont]), full, fused=fused)
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert (small.n_slots, small.max_len) == (5, 24) and small.lens[:2].tolist() == [17, 23]


def test_cache_memory_follows_the_tokens_in_flight():
    """A long-context model decoding short replies holds positions for what it generates, not
    rows x its whole context, gives the memory back when it goes idle, and decodes the same tokens
    as one request at a time."""
    torch.manual_seed(0)
    m = GPT(preset("micro", vocab_size=VOCAB, max_seq_len=4096)).eval()
    eng = Engine(m, ByteTokenizer(), max_batch=32)
    p = SamplingParams(max_new_tokens=100, temperature=0, logit_bias={EOS: -100, END: -100})
    prompts = [[BOS, 65 + i, 66, 67] for i in range(3)]
    reqs = [eng.add_request(ids, p) for ids in prompts]
    seen = []
    while not all(r.finished for r in reqs):
        eng.step()
        if eng.cache is not None:
            seen.append((eng.cache.n_slots, eng.cache.max_len))
    assert max(n for n, _ in seen) < 32 and max(L for _, L in seen) <= 128, seen
    assert len({L for _, L in seen}) > 1  # it grew as the replies got longer
    assert eng.cache is None and eng.num_active == 0
    for ids, r in zip(prompts, reqs):
        assert len(r.completions[0].token_ids) == 100
        assert r.completions[0].token_ids == eng.generate(ids, p)[0].token_ids


def test_length_grouped_batches_cover_each_example_once_pad_less_and_leave_small_sets_alone():
    import random
    from chatsmith.batching import epoch_batch, length_grouped_batch
    rng = random.Random(0)
    lens = [rng.choice([20, 30, 40, 60, 90, 370]) for _ in range(8 * 16)]  # dialogues with a long tail
    batches = [length_grouped_batch(5, i, 8, len(lens), lens.__getitem__) for i in range(16)]
    assert sorted(j for b in batches for j in b) == list(range(len(lens)))  # one epoch: each once
    assert batches == [length_grouped_batch(5, i, 8, len(lens), lens.__getitem__) for i in range(16)]
    def padded(bs):  # what a right-padded batch computes on
        return sum(len(b) * max(lens[j] for j in b) for b in bs)
    plain = [epoch_batch(5, i, 8, len(lens)) for i in range(16)]
    assert padded(batches) < 0.7 * padded(plain)
    # 7 examples in batches of 4: a pool of several epochs would put an example's copies together
    small = [length_grouped_batch(5, i, 4, 7, [3, 1, 4, 1, 5, 9, 2].__getitem__) for i in range(6)]
    assert [sorted(b) for b in small] == [sorted(epoch_batch(5, i, 4, 7)) for i in range(6)]
