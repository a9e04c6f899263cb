"""`chatsmith eval` (chatsmith.eval.runner and the modules it uses): task files, prompting modes,
scoring, metrics.json.

Generations are forced (Engine.generate_many patched) where a test checks scoring, so the numbers
do not depend on what a 60-step micro model happens to say; one test runs real generation."""

import json
import math
import shutil

import pytest
import sacrebleu
import torch
import torch.nn as nn

from chatsmith.batching import continuation_logprobs
from chatsmith.checkpoint import load_model
from chatsmith.engine import Completion, Engine
from chatsmith.errors import UserError
from chatsmith.eval.lm import score_documents
from chatsmith.eval.prompting import (MODES, PROMPTS_DIR, draw_examples, load_template, model_has_chat_template,
                                      parse_template)
from chatsmith.eval.runner import format_table, run_eval
from chatsmith.eval.scoring import extract_cot_answer, pick_choices, score_references, win_rate
from chatsmith.eval.taskfile import Item
from chatsmith.tokenizer import Tokenizer


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(base_model, tmp_path_factory):
    """A private copy of the micro base model (run_eval writes MODEL_DIR/eval by default)."""
    d = tmp_path_factory.mktemp("evalmodel") / "model"
    shutil.copytree(base_model, d, ignore=shutil.ignore_patterns("checkpoints", "data"))
    return d


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.load(model_dir)


@pytest.fixture
def forced(monkeypatch, tok):
    """Patch generation: `forced.reply(prompt_text) -> str` decides each reply; the prompts and
    sampling params seen are recorded."""
    class Forced:
        prompts, params = [], []

        @staticmethod
        def reply(text):
            return ""

    def fake(self, prompts, p, max_batch=32):
        Forced.params.append(p)
        out = []
        for ids in prompts:
            Forced.prompts.append(ids)
            text = Forced.reply(tok.decode(ids))
            out.append(Completion(tok.encode(text), text, "stop"))
        return out

    monkeypatch.setattr(Engine, "generate_many", fake)
    return Forced


# --------------------------------------------------------------------------- scoring pieces

def test_reference_scores_are_sacrebleus():
    hyps = ["the cat sat on the mat", "a dog barked loudly", "hello world", ""]
    refs = [["the cat sat on the mat"], ["the dog barked", "a dog was barking loudly"],
            ["hello there world"], ["nothing"]]
    got = score_references(hyps, refs)
    streams = [[r[0] for r in refs], [r[1] if len(r) > 1 else None for r in refs]]
    assert got["bleu"] == sacrebleu.corpus_bleu(hyps, streams).score
    assert got["chrf"] == sacrebleu.corpus_chrf(hyps, streams).score
    one = score_references(hyps[:1] + hyps[2:3], [refs[0], refs[2]])
    assert one["bleu"] == sacrebleu.corpus_bleu([hyps[0], hyps[2]], [[refs[0][0], refs[2][0]]]).score


class BigramStub(nn.Module):
    """A model whose next-token logits are a fixed function of the current token."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table, dtype=torch.float32))
        self.cfg = type("Cfg", (), {"max_seq_len": 8})()

    def forward(self, x):
        return self.table[x]


def test_choice_log_likelihood_by_hand():
    table = [[0.0, 1.0, 2.0, 0.5], [3.0, 0.0, 0.0, 1.0], [0.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    model = BigramStub(table)
    lp = [[v - math.log(sum(math.exp(u) for u in row)) for v in row] for row in table]
    ctx = [3, 0]
    pairs = [(ctx, [2]), (ctx, [1, 0]), (ctx, [3, 3, 3])]
    got, truncated = continuation_logprobs(model, pairs, pad_id=0, batch_size=2)
    want = [lp[0][2], lp[0][1] + lp[1][0], lp[0][3] + lp[3][3] + lp[3][3]]
    assert truncated == 0
    assert got == pytest.approx(want, abs=1e-6)
    # the highest log-likelihood wins; the per-byte variant can prefer a longer choice
    item = Item("t:1", [{"role": "user", "content": "q"}], "choice", choices=["x", "yy", "zzzzzz"], label=2)
    picked = pick_choices([item], [got])
    assert picked["picks"][0][0] == max(range(3), key=lambda j: got[j])
    sums = [-2.0, -1.5, -3.0]
    picked = pick_choices([item], [sums])
    assert picked["picks"] == [(1, 2)] and picked["accuracy"] == 0 and picked["accuracy_norm"] == 1
    # a context longer than the window is cut from the left, the choice kept whole
    long_ctx = [1, 2, 3, 0, 1, 2, 3, 0, 1, 2]
    (lp_long,), truncated = continuation_logprobs(model, [(long_ctx, [1, 0])])
    assert truncated == 1 and lp_long == pytest.approx(lp[2][1] + lp[1][0], abs=1e-6)


def test_cot_answer_is_read_from_the_last_line():
    assert extract_cot_answer("37 + 48 = 85.\nThe answer is 85.\n") == "85"
    assert extract_cot_answer("Paris is in France.\n\nThe answer is Paris.  \n\n") == "Paris"
    assert extract_cot_answer("The answer is 4.\nActually, 5") == "Actually, 5"
    assert extract_cot_answer("Final answer: 3.5") == "3.5"
    assert extract_cot_answer("   \n") == ""


def test_k_shot_draws_are_deterministic_and_never_evaluated_items():
    def item(i):
        return Item(f"f:{i}", [{"role": "user", "content": f"question number {i}?"}], "exact_match",
                    answers=[str(i)])

    evaluated = [item(i) for i in range(5)]
    pool = [item(i) for i in range(30)]  # the pool holds the evaluated questions too
    keys = {it.key for it in evaluated}
    draws = [draw_examples(it, pool, 3, seed=7, exclude=keys) for it in evaluated]
    for d in draws:
        assert len(d) == 3 and not {e.key for e in d} & keys
    assert draws == [draw_examples(it, pool, 3, seed=7, exclude=keys) for it in evaluated]
    assert draws != [draw_examples(it, pool, 3, seed=8, exclude=keys) for it in evaluated]
    # an item's draw does not depend on the other evaluated items (--limit)
    assert draw_examples(evaluated[0], pool, 3, 7, keys) == draws[0]
    assert draw_examples(evaluated[0], pool[:6], 3, 7, keys) == [pool[5]]


# --------------------------------------------------------------------------- task files

@pytest.mark.parametrize("line,msg", [
    ('{"prompt": "q"}', 'exactly one kind of target'),
    ('{"answer": "a"}', '"prompt"'),
    ('{"prompt": 3, "answer": "a"}', '"prompt" must be a non-empty string'),
    ('{"prompt": "q", "answers": "a"}', '"answers" must be a list'),
    ('{"prompt": "q", "choices": ["a", "b"]}', '"label"'),
    ('{"prompt": "q", "choices": ["a", "b"], "label": 2}', 'there are 2 choices'),
    ('{"prompt": "q", "choices": ["a"], "label": 0}', 'at least two'),
    ('{"prompt": "q", "reference": [1]}', '"reference" must be a string'),
    ('{"prompt": "q", "answer": "a", "reference": "r"}', 'exactly one kind'),
    ('{"messages": [{"role": "assistant", "content": "x"}], "answer": "a"}', "user's question"),
    ('{"prompt": "q", "answer": "a"', 'not valid JSON'),
    ('["q", "a"]', 'not a JSON object'),
    ('{"prompt": "q", "choices": ["a", "b"], "label": 0}', 'put each kind of task in its own file'),
])
def test_bad_task_files_name_file_and_line(tmp_path, line, msg):
    f = write_jsonl(tmp_path / "t.jsonl", ['{"prompt": "ok", "answer": "fine"}', "", line])
    with pytest.raises(UserError) as e:
        run_eval(tmp_path / "no-model", [str(f)], out=tmp_path, quiet=True)
    assert f"{f}:3:" in str(e.value) and msg in str(e.value)


def test_empty_task_file_unknown_task_and_missing_pool(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="empty"):
        run_eval(tmp_path, [str(empty)], quiet=True)
    with pytest.raises(UserError) as e:
        run_eval(tmp_path, ["nonsense"], quiet=True)
    for form in ("lm:PATH", "arithmetic", "word_problem", "quiz", "PATH.jsonl"):
        assert form in str(e.value)
    f = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "q", "answer": "a"}])
    with pytest.raises(UserError, match="qa.pool.jsonl"):
        run_eval(tmp_path, [str(f)], mode="k-shot", quiet=True)
    with pytest.raises(UserError, match="mode"):
        run_eval(tmp_path, [str(f)], mode="five-shot", quiet=True)


def test_templates_parse_and_override(tmp_path):
    for mode in MODES:
        t = load_template(mode)
        assert "{question}" in t.chat and "{question}" in t.plain
    assert load_template("k-shot").uses_examples and not load_template("cot").uses_examples
    t = parse_template("# a comment\nQ: {question}\nA:\n")
    assert t.chat == t.plain == "Q: {question}\nA:"
    with pytest.raises(UserError, match="unknown placeholder"):
        parse_template("[plain]\n{questoin}\n")
    with pytest.raises(UserError, match="no such template"):
        load_template("cot", tmp_path)


# --------------------------------------------------------------------------- run_eval

def test_exact_match_with_alternatives_and_metrics_json(model_dir, forced):
    rows = [{"prompt": "Which river flows through Cairo?", "answers": ["Nile", "the Nile river"]},
            {"prompt": "What is 37 + 48?", "answer": 85, "family": "arithmetic"},
            {"prompt": "Capital of Peru?", "answer": "Lima"},
            {"prompt": "Brace {question} test?", "answer": "yes"}]
    f = write_jsonl(model_dir / "qa.jsonl", rows)
    replies = {"Cairo": " The Nile river.", "37 + 48": " 37 + 48 = 85. The answer is 85.",
               "Peru": " Quito", "Brace": " yes"}
    forced.reply = lambda text: next(v for k, v in replies.items() if k in text)
    m = run_eval(model_dir, [str(f)], quiet=True)
    r = m["tasks"][str(f)]
    assert r["kind"] == "exact_match" and r["n"] == 4 and r["correct"] == 3 and r["accuracy"] == 0.75
    assert [s["correct"] for s in r["samples"]] == [True, True, False]
    assert forced.params[-1].stop == ["\n"] and forced.params[-1].temperature == 0
    # a base model gets the plain template; braces in a question are not placeholders
    assert forced.prompts[0] == [*Tokenizer.load(model_dir).encode(
        "Question: Which river flows through Cairo?\nAnswer:", bos=True)]
    assert r["samples"][0]["prompt"] == "Question: Which river flows through Cairo?\nAnswer:"
    assert forced.prompts[3] == Tokenizer.load(model_dir).encode("Question: Brace {question} test?\nAnswer:", bos=True)
    saved = json.loads((model_dir / "eval" / "metrics.json").read_text())
    assert saved["mode"] == "zero-shot" and saved["seed"] == 0 and saved["k"] == 0 and saved["chat"] is False
    assert saved["template"]["path"].endswith("zero-shot.txt") and saved["tasks"][str(f)]["n"] == 4
    assert m["limit"] is None
    assert run_eval(model_dir, [str(f)], limit=2, out=model_dir / "e2", quiet=True)["tasks"][str(f)]["n"] == 2


def test_pass_at_k_by_hand_and_majority_vote():
    from chatsmith.eval.scoring import pass_at_k, sampled_scores
    assert pass_at_k(4, 0, 2) == 0 and pass_at_k(4, 3, 2) == 1.0  # 1 wrong cannot fill 2 draws
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    q = [{"role": "user", "content": "q"}]
    items = [Item(f"a:{i}", q, "exact_match", family="arithmetic", answers=[a]) for i, a in enumerate(["12", "7", "5"])]
    ok, r = sampled_scores(items, [["The answer is 12.", "12", "The answer is 13.", "The answer is 13."],
                                   ["7", "7", "7", "7"], ["4", "6", "4", "9"]], 0.8)
    assert ok[0] == [True, True, False, False] and r["samples"] == 4 and r["temperature"] == 0.8
    assert r["pass_at"] == {"1": pytest.approx((0.5 + 1 + 0) / 3), "2": pytest.approx((5 / 6 + 1 + 0) / 3),
                            "4": pytest.approx(2 / 3)}
    # item 1: "12" twice and "13" twice, a tie the first seen wins; item 3: the majority "4" is wrong
    assert r["maj_at_4"] == pytest.approx(2 / 3) and r["edge_share"] == pytest.approx(1 / 3)


def test_samples_report_pass_at_k_next_to_the_greedy_answer(model_dir, tmp_path, monkeypatch):
    f = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "What is 2 + 2?", "answer": "4"},
                                            {"prompt": "What is 3 + 3?", "answer": "6"}])
    seen = []

    def fake(self, prompts, p, max_batch=32, n=1):  # greedy: always "4"; sampled: 4, 5, 6, 6 in turn
        seen.append((p.temperature, n))
        texts = [" 4"] * len(prompts) if p.temperature == 0 else [t for _ in prompts for t in (" 4", " 5", " 6", " 6")]
        return [Completion(Tokenizer.load(model_dir).encode(t), t, "stop") for t in texts]
    monkeypatch.setattr(Engine, "generate_many", fake)
    r = run_eval(model_dir, [str(f)], out=tmp_path, quiet=True, samples=4, temperature=0.7)
    t = r["tasks"][str(f)]
    assert seen == [(0, 1), (0.7, 4)] and t["accuracy"] == 0.5  # greedy "4" is right once
    assert t["sampled"]["pass_at"]["1"] == pytest.approx((0.25 + 0.5) / 2) and t["sampled"]["pass_at"]["4"] == 1.0
    assert t["sampled"]["maj_at_4"] == 0.5 and t["sampled"]["edge_share"] == 1.0  # the vote "6" is right for 3 + 3
    assert "pass@4 1.000" in format_table(r) and r["decoding"].startswith("greedy, and 4 samples")
    for bad in ({"samples": 0}, {"temperature": 0.0}):
        with pytest.raises(UserError, match="--samples|--temperature"):
            run_eval(model_dir, [str(f)], out=tmp_path, quiet=True, **bad)


def test_reference_task_reports_sacrebleu_on_the_generations(model_dir, forced, tmp_path):
    rows = [{"prompt": "Translate: le chat", "reference": "the cat"},
            {"prompt": "Translate: le chien noir", "reference": ["the black dog", "a black dog"]},
            {"prompt": "Translate: bonjour", "reference": "hello"}]
    f = write_jsonl(tmp_path / "mt.jsonl", rows)
    out = {"chat": " the cat", "chien": " black dog the", "bonjour": " good day"}
    forced.reply = lambda text: next(v for k, v in out.items() if k in text)
    r = run_eval(model_dir, [str(f)], out=tmp_path, quiet=True)["tasks"][str(f)]
    hyps = ["the cat", "black dog the", "good day"]
    streams = [["the cat", "the black dog", "hello"], [None, "a black dog", None]]
    assert r["bleu"] == sacrebleu.corpus_bleu(hyps, streams).score
    assert r["chrf"] == sacrebleu.corpus_chrf(hyps, streams).score


def test_cot_mode_reads_the_last_line(model_dir, forced, tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "What is 2 + 2?", "answer": "4"},
                                           {"prompt": "What is 3 + 3?", "answer": "6"}])
    forced.reply = lambda text: (" 2 + 2 = 4.\nThe answer is 4." if "2 + 2" in text
                                 else " The answer is 6.\nHmm, no: 7")
    # the stock instruction does not fit the micro model's 64-token context: counted, scored wrong
    r = run_eval(model_dir, [str(f)], mode="cot", out=tmp_path, quiet=True)["tasks"][str(f)]
    assert r["too_long"] == 2 and r["correct"] == 0 and "Think step by step" in r["samples"][0]["prompt"]
    # an edited copy of the templates folder
    tdir = tmp_path / "prompts"
    shutil.copytree(PROMPTS_DIR, tdir)
    (tdir / "cot.txt").write_text("# short\n[plain]\n{question} Think.\n")
    m = run_eval(model_dir, [str(f)], mode="cot", out=tmp_path, quiet=True, templates_dir=tdir)
    r = m["tasks"][str(f)]
    assert [s["extracted"] for s in r["samples"]] == ["4", "Hmm, no: 7"] and r["correct"] == 1
    assert r["samples"][0]["prompt"] == "What is 2 + 2? Think." and forced.params[-1].stop == ["\n\n"]
    assert m["mode"] == "cot" and m["template"]["path"] == str(tdir / "cot.txt")


def test_k_shot_user_pool_and_builtin_train_pool(model_dir, forced, tmp_path):
    qs = [f"Spell item {w}?" for w in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf")]
    rows = [{"prompt": q, "answer": q.split()[2][:-1]} for q in qs]
    f = write_jsonl(tmp_path / "spell.jsonl", rows[:3])
    pool = write_jsonl(tmp_path / "pool.jsonl", rows)  # holds the evaluated items too
    forced.reply = lambda text: " x"
    runs = [run_eval(model_dir, [str(f)], mode="k-shot", k=2, pool=str(pool), seed=s, out=tmp_path,
                     quiet=True, max_new_tokens=2)["tasks"][str(f)] for s in (1, 1)]
    assert runs[0]["samples"] == runs[1]["samples"]
    evaluated = {q for q in qs[:3]}
    for s in runs[0]["samples"]:
        # the item's own question appears once, last; no other evaluated question appears
        own = s["prompt"].split("Question: ")[-1].split("?")[0] + "?"
        assert own in evaluated and s["prompt"].count(own) == 1
        assert not any(q in s["prompt"] for q in evaluated - {own})
        assert s["prompt"].count("Question: ") >= 1
    assert runs[0]["pool"] == str(pool)
    # the micro model's 64-token context fits fewer than 2 examples: they are dropped, counted
    assert runs[0]["fewer_shots"] >= 1 and runs[0]["too_long"] == 0

    def dialogue(q, a, fam="arithmetic"):
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"The answer is {a}."}],
                "family": fam, "answers": [str(a)]}

    chat = tmp_path / "chat"
    chat.mkdir()
    write_jsonl(chat / "heldout.jsonl", [dialogue("1+1?", 2), dialogue("Capital?", "Paris", "quiz"),
                                         dialogue("2+2?", 4)])
    write_jsonl(chat / "train.jsonl", [dialogue("3+3?", 6), dialogue("Cap?", "Rome", "quiz")])
    forced.reply = lambda text: " 2" if "1+1?\nAnswer:" in text else " 5"
    m = run_eval(model_dir, ["arithmetic", "quiz"], heldout=str(chat / "heldout.jsonl"), mode="k-shot", k=3,
                 out=tmp_path, quiet=True, max_new_tokens=2)
    r = m["tasks"]["arithmetic"]
    assert r["n"] == 2 and r["correct"] == 1 and r["pool"] == str(chat / "train.jsonl")
    assert all("3+3?" in s["prompt"] and "Cap?" not in s["prompt"] for s in r["samples"])
    assert m["k"] == 3 and m["tasks"]["quiz"]["n"] == 1


def test_multiple_choice_matches_a_direct_computation(model_dir, tok, tmp_path):
    rows = [{"prompt": "The king said", "choices": ["to the queen", "ships", "seven"], "label": 0},
            {"prompt": "In the river there were", "choices": ["three", "love war"], "label": 1}]
    f = write_jsonl(tmp_path / "mc.jsonl", rows)
    r = run_eval(model_dir, [str(f)], out=tmp_path, quiet=True)["tasks"][str(f)]
    model = load_model(model_dir)
    for row, s in zip(rows, r["samples"]):
        ctx = tok.encode(f"Question: {row['prompt']}\nAnswer:", bos=True)
        want = []
        for ch in row["choices"]:
            ids = ctx + tok.encode(" " + ch)
            with torch.no_grad():
                lp = model(torch.tensor([ids[:-1]])).float().log_softmax(-1)[0]
            want.append(sum(lp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids))))
        assert s["logprobs"] == pytest.approx(want, abs=1e-4)
        assert s["picked"] == max(range(len(want)), key=lambda j: want[j])
    assert 0 <= r["accuracy"] <= 1 and "accuracy_norm" in r


def test_lm_task_equals_score_documents(model_dir, tok, tmp_path):
    docs = ["The king said to the queen.", "Love and war and peace.\nSeven ships on the sea."]
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])
    r = run_eval(model_dir, [f"lm:{f}"], out=tmp_path, quiet=True)["tasks"][f"lm:{f}"]
    want = score_documents(load_model(model_dir), tok, docs)
    for key in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes"):
        assert r[key] == want[key]
    assert r["n"] == 2


def test_chat_template_prompts_and_real_generation(model_dir, tok, forced, tmp_path, monkeypatch):
    assert model_has_chat_template(model_dir) is False  # a pretrain-stage checkpoint
    f = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "system", "content": "Be terse."},
                                                         {"role": "user", "content": "Name a sea."}],
                                            "answer": "red"}])
    run_eval(model_dir, [str(f)], chat=True, out=tmp_path, quiet=True)
    want, _ = tok.render_chat([{"role": "system", "content": "Be terse."},
                               {"role": "user", "content": "Name a sea."}], add_generation_prompt=True)
    assert forced.prompts[-1] == want and forced.params[-1].stop == []
    monkeypatch.undo()  # real generation from here on
    m = run_eval(model_dir, [str(f), str(f)], out=tmp_path, quiet=True, max_new_tokens=4)
    r = m["tasks"][str(f)]
    assert r["n"] == 1 and isinstance(r["samples"][0]["reply"], str) and len(m["tasks"]) == 1


# --------------------------------------------------------------------------- held-out check, reward tasks

def dialogue(q, a, fam="arithmetic"):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"The answer is {a}."}],
            "family": fam, "answers": [str(a)]}


def test_builtin_tasks_are_checked_against_train_by_prompt_hash(model_dir, forced, tmp_path):
    chat = tmp_path / "chat"
    chat.mkdir()
    write_jsonl(chat / "heldout.jsonl", [dialogue("What is 1 + 1?", 2), dialogue("What is 2 + 5?", 7)])
    write_jsonl(chat / "train.jsonl", [dialogue("What is 3 + 3?", 6)])
    forced.reply = lambda text: " 2"
    m = run_eval(model_dir, ["arithmetic"], heldout=str(chat / "heldout.jsonl"), out=tmp_path, quiet=True)
    chk = m["tasks"]["arithmetic"]["never_trained"]
    assert chk == {"checked": True, "against": str(chat / "train.jsonl"), "items": 2, "train_prompts": 1,
                   "overlap": 0}
    # the same question in train (after normalisation: case, spaces) is a leak: refused, named
    write_jsonl(chat / "train.jsonl", [dialogue("what is 2  +  5?", 7)])
    with pytest.raises(UserError, match=r"1 held-out item.*heldout.jsonl:2"):
        run_eval(model_dir, ["arithmetic"], heldout=str(chat / "heldout.jsonl"), out=tmp_path, quiet=True)
    (chat / "train.jsonl").unlink()
    m = run_eval(model_dir, ["arithmetic"], heldout=str(chat / "heldout.jsonl"), out=tmp_path, quiet=True)
    assert m["tasks"]["arithmetic"]["never_trained"]["checked"] is False


def test_win_rate_by_hand():
    r = win_rate([1.0, 0.5, 2.0, -1.0, 0.0], [0.0, 0.5, 3.0, -2.0, -0.5])
    # wins: 1>0, -1>-2, 0>-0.5 -> 3; tie: 0.5=0.5; loss: 2<3 -> (3 + 0.5) / 5
    assert (r["wins"], r["ties"], r["losses"]) == (3, 1, 1)
    assert r["win_rate"] == pytest.approx(0.7)
    assert r["win_rate_ci95"] == pytest.approx(1.96 * math.sqrt(0.7 * 0.3 / 5))
    assert r["mean_margin"] == pytest.approx((1 + 0 - 1 + 1 + 0.5) / 5)
    assert win_rate([1.0], [1.0])["win_rate"] == 0.5


class LengthJudge:
    """A stand-in reward model: the score of a conversation is the length of its last reply."""

    def __init__(self):
        self.seen = []

    def score(self, conversations):
        self.seen += conversations
        return [float(len(c[-1]["content"])) for c in conversations]


def test_reward_task_mean_score_and_win_rate(model_dir, tok, forced, tmp_path, monkeypatch):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Tell me about the sea.", "family": "chat"},
        {"prompt": [{"role": "user", "content": "Name a river."}], "chosen": "Nile", "rejected": "x"},
        {"prompt": "Tell me about the sea.", "family": "chat"},  # a repeated prompt counts once
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "reference reply"}]}])
    calls = []

    def replies(text):  # model A's replies on its first generate_many call, B's on the second
        a = {"sea": "waves", "river": "Nile", "Hi": "hello"}
        b = {"sea": "water!", "river": "Nile", "Hi": "hi"}
        which = a if len(calls) < 3 else b
        calls.append(text)
        return next(v for k, v in which.items() if k in text)

    forced.reply = replies
    judge = LengthJudge()
    m = run_eval(model_dir, [f"reward:{prompts}"], reward_model=judge, compare=model_dir, out=tmp_path, quiet=True)
    r = m["tasks"][f"reward:{prompts}"]
    # A: "waves"(5) "Nile"(4) "hello"(5); B: "water!"(6) "Nile"(4) "hi"(2)
    assert r["kind"] == "reward" and r["n"] == 3 and r["mean_reward"] == pytest.approx(14 / 3)
    assert r["reward_std"] == pytest.approx(math.sqrt(((5 - 14 / 3) ** 2 * 2 + (4 - 14 / 3) ** 2) / 3))
    assert r["mean_reward_b"] == pytest.approx(4.0)
    assert (r["wins"], r["ties"], r["losses"]) == (1, 1, 1) and r["win_rate"] == pytest.approx(0.5)
    assert r["reward_by_family"] == {"chat": 5.0, "text": 4.5}
    # the judge saw chat conversations ending with each reply; the reference reply was dropped
    assert judge.seen[2] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello"}]
    # prompts went through the chat template
    want, _ = tok.render_chat([{"role": "user", "content": "Name a river."}], add_generation_prompt=True)
    assert forced.prompts[1] == want
    assert r["samples"][0] == {"loc": f"{prompts}:1", "prompt": "Tell me about the sea.", "reply": "waves",
                               "reward": 5.0, "reply_b": "water!", "reward_b": 6.0}
    assert "win rate 50.0%" in format_table(m) and m["compare"] == str(model_dir)


def test_reward_task_on_builtin_heldout_prompts(model_dir, forced, tmp_path):
    chat = tmp_path / "chat"
    chat.mkdir()
    write_jsonl(chat / "heldout.jsonl", [dialogue("What is 1 + 1?", 2), dialogue("Capital of Peru?", "Lima", "quiz"),
                                         {"messages": [{"role": "user", "content": "Hello!"},
                                                       {"role": "assistant", "content": "Hi."}], "family": "chatterbot"}])
    write_jsonl(chat / "train.jsonl", [dialogue("What is 3 + 3?", 6)])
    forced.reply = lambda text: "ok"
    m = run_eval(model_dir, ["reward"], heldout=str(chat / "heldout.jsonl"), reward_model=LengthJudge(),
                 out=tmp_path, quiet=True)
    r = m["tasks"]["reward"]
    assert r["n"] == 3 and r["mean_reward"] == 2.0 and r["never_trained"]["checked"] is True
    assert set(r["reward_by_family"]) == {"arithmetic", "quiz", "chatterbot"} and "win_rate" not in r


def test_reward_task_bad_input(model_dir, base_model, tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    with pytest.raises(UserError, match="--reward-model"):
        run_eval(model_dir, [f"reward:{f}"], out=tmp_path, quiet=True)
    with pytest.raises(UserError, match="--compare"):
        run_eval(model_dir, [str(write_jsonl(tmp_path / "q.jsonl", [{"prompt": "q", "answer": "a"}]))],
                 compare=model_dir, out=tmp_path, quiet=True)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"question": "where is the prompt?"}])
    with pytest.raises(UserError, match=f"{bad}:2:.*\"prompt\""):
        run_eval(model_dir, [f"reward:{bad}"], reward_model=LengthJudge(), out=tmp_path, quiet=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="empty"):
        run_eval(model_dir, [f"reward:{empty}"], reward_model=LengthJudge(), out=tmp_path, quiet=True)
    with pytest.raises(UserError, match="reward:prompts.jsonl"):
        run_eval(model_dir, ["reward:"], reward_model=LengthJudge(), out=tmp_path, quiet=True)


def test_a_model_without_a_reward_head_is_a_user_error(model_dir, tmp_path):
    from conftest import cli

    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    # the micro base model has no score head: exit 2 with a message, before anything is generated
    assert cli("eval", model_dir, "--tasks", f"reward:{f}", "--reward-model", model_dir, "--out", tmp_path,
               "--device", "cpu") == 2
    assert cli("eval", model_dir, "--tasks", f"reward:{f}", "--out", tmp_path) == 2
    assert cli("eval", model_dir, "--tasks", "no_such_task") == 2


def test_reward_task_with_a_real_reward_head(model_dir, tmp_path):
    """End to end through load_reward_model: an (untrained) score head on the micro model judges
    real greedy replies; A against itself is all ties."""
    from chatsmith.checkpoint import write_model_files

    model = load_model(model_dir)
    assert not model.cfg.score_head  # the micro base model has none: the test gives it one
    torch.manual_seed(0)
    model.add_head("score")
    assert model.cfg.score_head and model.score.weight.shape == (1, model.cfg.d_model)
    rm = tmp_path / "rm"
    rm.mkdir()
    write_model_files(rm, model, model_dir, {"stage": "reward"})
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "The king said"}, {"prompt": "Seven ships"}])
    m = run_eval(model_dir, [f"reward:{f}"], reward_model=str(rm), compare=model_dir, out=tmp_path,
                 quiet=True, max_new_tokens=4)
    r = m["tasks"][f"reward:{f}"]
    from chatsmith.train.reward import load_reward_model

    judge = load_reward_model(rm)
    want = judge.score([[{"role": "user", "content": s["prompt"]}, {"role": "assistant", "content": s["reply"]}]
                        for s in r["samples"]])
    assert [s["reward"] for s in r["samples"]] == pytest.approx(want, abs=1e-5)
    assert r["ties"] == 2 and r["win_rate"] == 0.5 and m["reward_model"] == str(rm)
