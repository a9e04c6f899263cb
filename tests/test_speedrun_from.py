"""`speedrun --from MODEL`: the retention check, the refusals (exit 2, nothing written), and (slow) the
whole chain on a tiny random Llama-shaped "pretrained" model with LoRA."""

import json
import os
from pathlib import Path

import pytest
import torch

from chatsmith import speedrun_from as F
from chatsmith.checkpoint import load_model
from chatsmith.data.sources import available_sources
from chatsmith.eval.retention import Fact, build_facts, definition_gloss, facts_correct, retention
from chatsmith.errors import UserError
from chatsmith.model.lora import ADAPTER_WEIGHTS
from conftest import REPO, cli

SOURCES = Path(os.environ.get("CHATSMITH_SOURCES") or REPO / ".sources")


# --- retention -------------------------------------------------------------------------------------

class WordTok:
    """One token per whole string: a question or an answer is a single id, so a fake model can say
    which answer follows which question."""

    pad_id, bos, end = 0, 1, 2

    def __init__(self):
        self.ids: dict[str, int] = {}

    def id(self, s: str) -> int:
        return self.ids.setdefault(s, 3 + len(self.ids))

    def render_chat(self, msgs, add_generation_prompt=False):
        q, a = msgs[0]["content"], msgs[1]["content"]
        return [self.bos, self.id(q), self.id(a), self.end], [0, 0, 1, 1]


class Knows(torch.nn.Module):
    """Logits that put the answer it 'knows' (question id -> answer id) far above the rest."""

    def __init__(self, tok: WordTok, knows: dict[str, str], vocab: int = 64):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.knows, self.vocab = tok, knows, vocab

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.vocab)
        for q, a in self.knows.items():
            logits[..., self.tok.id(a)] += 8.0 * (x == self.tok.id(q)).float()
        return logits


def quiz(q, a, source="quiz/capitals"):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            "family": "quiz", "source": source, "answers": [a]}


CAPITALS = [quiz("Capital of France?", "Paris"), quiz("Capital of Italy?", "Rome"),
            quiz("Capital of Spain?", "Madrid"), quiz("Capital of Peru?", "Lima"),
            quiz("Capital of Chad?", "N'Djamena")]


def test_facts_take_distractors_from_the_same_quiz_file_and_hide_the_headword():
    recs = CAPITALS + [quiz("Atomic number of gold?", "79", "quiz/elements")] + [
        {"messages": [{"role": "user", "content": f"What is the meaning of the word '{w}'?"},
                      {"role": "assistant", "content": f"{w} (noun): {g}. For example: \"a {w}\"."}],
         "family": "definition", "source": "wordnet/noun"}
        for w, g in (("cat", "a small feline"), ("dog", "a domestic canine"), ("owl", "a night bird"),
                     ("cow", "a farm bovine"))]
    facts = build_facts(recs, choices=4, seed=0)
    by_q = {f.question: f for f in facts}
    assert "Atomic number of gold?" not in by_q  # its file has no other answers to draw distractors from
    paris = by_q["Capital of France?"]
    assert paris.options[0] == "Paris" and len(set(paris.options)) == 4
    assert set(paris.options[1:]) <= {"Rome", "Madrid", "Lima", "N'Djamena"}
    cat = by_q["What is the meaning of the word 'cat'?"]
    assert cat.options[0] == "a small feline." and all("cat" not in o for o in cat.options)
    assert definition_gloss("bank (noun): a slope. For example: \"the river bank\".") == "a slope."


def test_facts_correct_follows_what_the_model_knows_and_retention_counts_only_known_facts():
    tok = WordTok()
    facts = [Fact("quiz", r["messages"][0]["content"],
                  [r["messages"][1]["content"]] + [o["messages"][1]["content"] for o in CAPITALS if o is not r][:3],
                  "quiz/capitals") for r in CAPITALS[:4]]
    before = Knows(tok, {"Capital of France?": "Paris", "Capital of Italy?": "Rome", "Capital of Spain?": "Madrid",
                         "Capital of Peru?": "Rome"})  # Peru: wrong
    after = Knows(tok, {"Capital of France?": "Paris", "Capital of Italy?": "Madrid", "Capital of Spain?": "Madrid",
                        "Capital of Peru?": "Lima"})  # forgot Italy, learned Peru
    known = facts_correct(before, tok, facts, batch_size=3)
    assert known == [True, True, True, False]
    now = facts_correct(after, tok, facts, batch_size=5)
    assert now == [True, False, True, True]
    r = retention(known, now)
    assert r == {"known_before": 3, "kept": 2, "retention": pytest.approx(2 / 3)}
    assert retention([False, False], [True, True])["retention"] is None  # nothing known: no retention to state
    with pytest.raises(ValueError):
        retention([True], [True, False])


def test_steps_spec():
    assert F.parse_steps("sft=40,reward=30,rl=10,dpo=20") == {"sft": 40, "reward": 30, "rl": 10, "dpo": 20}
    assert F.parse_steps(None) is None


# --- bad input: exit 2, one line, nothing written ---------------------------------------------------

def _refused(capsys, out: Path, *args, match: str):
    rc = cli("speedrun", "--out", out, "--sources-dir", SOURCES, *args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert match in err, err
    assert not out.exists()
    return err


@pytest.mark.parametrize("args,match", [
    (["--minutes", 3], "is too short for the chain on a pretrained model"),
    (["--steps", "sft=4,rl=2"], "missing: reward, dpo"),
    (["--steps", "sft=4,reward=x,rl=2,dpo=1"], "is not STAGE=STEPS"),
    (["--name", ""], "--name must be"),
    (["--eval-items", 3], "--eval-items 3"),
])
def test_bad_flags_are_refused_before_anything_runs(capsys, tmp_path, args, match):
    _refused(capsys, tmp_path / "run", "--from", "smollm2", *args, match=match)


def test_bad_data_record_is_refused_as_sft_refuses_it(capsys, tmp_path):
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"dialogue": ["hi", "hello"]}\n{"messages": [{"role": "user"}]}\n')
    _refused(capsys, tmp_path / "run", "--from", "smollm2", "--data", bad, "--steps", "sft=1,reward=1,rl=1,dpo=1",
             match="mine.jsonl:2")


def test_steps_without_from_is_refused(capsys, tmp_path):
    _refused(capsys, tmp_path / "run", "--steps", "sft=1,reward=1,rl=1,dpo=1", match="--steps is for")


@pytest.fixture
def fake_data(monkeypatch):
    """The built-in data replaced by a few dialogues, so refusals after the import run in a second."""
    def dialogues(out, **k):
        out.mkdir(parents=True, exist_ok=True)
        recs = [{"messages": [{"role": "user", "content": "What is 2 + 3?"},
                              {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}],
                 "family": "arithmetic", "answers": ["5"]}]
        for name in ("train.jsonl", "heldout.jsonl"):
            (out / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
        (out / "dialogues_meta.json").write_text(json.dumps({"families": {"arithmetic": {"train": 1}}}))

    monkeypatch.setattr(F, "build_dialogues", dialogues)
    monkeypatch.setattr(F, "build_preferences", lambda out: (out / "pairs_heldout.jsonl").write_text(""))
    monkeypatch.setattr(F, "available_sources", lambda d: ["fake"])


STEPS = ["--steps", "sft=1,reward=1,rl=1,dpo=1"]


def test_from_a_path_that_is_not_there(capsys, tmp_path, fake_data):
    _refused(capsys, tmp_path / "run", "--from", tmp_path / "nope", *STEPS, match="does not exist")


def test_from_an_encoder_is_not_a_causal_lm(capsys, tmp_path, fake_data, encoder_dir):
    _refused(capsys, tmp_path / "run", "--from", encoder_dir, *STEPS, match="is not a causal language model")


def test_from_a_model_whose_template_cannot_render_the_dialogues(capsys, tmp_path, fake_data):
    from test_interop import CHATML, make_hf

    hf = tmp_path / "hf"
    make_hf("llama", hf)
    cfg_f = hf / "tokenizer_config.json"
    cfg = json.loads(cfg_f.read_text())
    cfg["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'assistant' %}"
                            "{{ raise_exception('assistant turns are not supported') }}{% endif %}{% endfor %}"
                            + CHATML)
    cfg_f.write_text(json.dumps(cfg))
    err = _refused(capsys, tmp_path / "run", "--from", hf, *STEPS, match="cannot render the built-in arithmetic")
    assert "assistant turns are not supported" in err


# --- the whole chain, tiny -------------------------------------------------------------------------

def tiny_pretrained(d: Path):
    """A random Llama-shaped HF model with a ChatML tokenizer, context 512 (the dialogues fit)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from test_interop import VOCAB, hf_tokenizer

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2))
    m.save_pretrained(d)
    hf_tokenizer().save_pretrained(d)


@pytest.mark.slow
@pytest.mark.skipif(not available_sources(str(SOURCES)), reason="built-in sources missing: run scripts/setup.sh")
def test_chain_on_a_tiny_pretrained_model_with_lora(tmp_path, capsys):
    hf = tmp_path / "hf"
    tiny_pretrained(hf)
    run = tmp_path / "run"
    args = ["speedrun", "--from", hf, "--out", run, "--sources-dir", SOURCES, "--name", "Zed",
            "--steps", "sft=3,reward=2,rl=1,dpo=2", "--eval-items", 10, "--device", "cpu"]
    assert cli(*args) == 0
    res = json.loads((run / "speedrun.json").read_text())
    assert [r["stage"] for r in res["chain"]] == ["base", "sft", "rl", "dpo"]
    for stage in ("sft", "reward", "rl", "dpo"):  # every stage LoRA adapters, loadable, trained its steps
        d = run / stage
        assert (d / ADAPTER_WEIGHTS).exists() and not (d / "model.safetensors").exists(), stage
        assert json.loads((d / "train_summary.json").read_text())["steps"] == {"sft": 3, "reward": 2, "rl": 1,
                                                                                "dpo": 2}[stage]
        load_model(d)
    base = res["chain"][0]
    assert set(base["exact_match"]) == {"arithmetic", "word_problem", "number_sense"}
    assert all(n == 10 for _, n in base["exact_match_counts"].values())
    for r in res["chain"][1:]:
        assert r["judge_vs_previous"] is not None and 0 <= r["judge_vs_previous"] <= 1
        assert r["retention_counts"][1] == base["facts_known"][0]
    assert res["chain"][0]["kl_to_imported"] == 0.0
    # each stage against the one before, paired on the same items (the report's change table)
    assert res["chain"][0]["exact_match_vs_previous"] == {}
    for prev, r in zip(res["chain"], res["chain"][1:]):
        for fam, d in r["exact_match_vs_previous"].items():
            assert d["n"] == 10 and d["diff"] == pytest.approx(r["exact_match"][fam] - prev["exact_match"][fam])
    suite = json.loads((run / "data" / "eval_suite.json").read_text())
    assert not set(suite["identity"]) & set(F.IDENTITY_TRAIN)  # held-out phrasings are not trained on
    ident = [json.loads(x) for x in open(run / "data" / "identity.jsonl")]
    assert all("Zed" in r["messages"][1]["content"] for r in ident)
    report = (run / "report.md").read_text()
    assert "retention" in report.lower()
    assert "Newcombe's paired 95% interval" in report
    # a finished run resumed does no work again
    assert cli(*args, "--resume") == 0


def test_identity_needs_the_name_as_a_word_of_its_own():
    assert F.names_itself("I am Smith, built with chatsmith.", "Smith")
    assert F.names_itself("我是Smith，一个助手", "Smith")
    assert not F.names_itself("I was built with chatsmith.", "Smith")
    assert not F.names_itself("I am a blacksmith.", "Smith")
    assert F.names_itself("call me a.b (ok)", "a.b")


def test_time_budget_is_shared_after_the_fixed_costs(monkeypatch, tmp_path):
    """Budget mode with every stage faked: each trainer gets its share of what the budget leaves after
    the evaluations (the first one timed, the other three charged at its time) and the reserves."""
    import types

    from chatsmith.train import dpo, reward, rlhf, sft

    budgets, caps = {}, {}
    eval_s = 100.0
    clock = [1e6]  # a fake clock: a stage takes its budget (the reward model its held-out pairs too)
    monkeypatch.setattr(F, "time", types.SimpleNamespace(time=lambda: clock[0]))

    def prepare(a, run_dir):
        (run_dir / "data").mkdir(parents=True)
        (run_dir / "data" / "sft_train.jsonl").write_text("{}\n")
        (run_dir / "data" / "eval_suite.json").write_text(json.dumps({"name": a.name, "judge": [[]]}))
        return {}

    def stage(name):
        def run(cfg, *a, **k):
            assert (cfg.max_steps is None or name == "dpo") and cfg.lora_rank == F.LORA["lora_rank"]
            budgets[name] = cfg.max_minutes * 60
            caps[name] = cfg.max_steps
            clock[0] += budgets[name] + (F.REWARD_EVAL_S if name == "reward" else 0)
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            (Path(cfg.out) / "train_summary.json").write_text(json.dumps({"steps": 1, "tokens": 1}))
        return run

    def evaluate_stage(d, suite, base, known, quantize, amp=None):
        clock[0] += eval_s
        return {"exact_match": {"arithmetic": 0.5}, "exact_match_ci95": {"arithmetic": [0.1, 0.9]},
                "exact_match_counts": {"arithmetic": [1, 2]}, "facts_correct": [True], "identity": 0.0,
                "identity_counts": [0, 1], "judge_replies": ["x"], "conversation": [], "kl_to_imported": 0.0,
                "seconds": eval_s, **({"retention": {"retention": 1.0, "kept": 1, "known_before": 1}} if known else {})}

    monkeypatch.setattr(F, "prepare", prepare)
    monkeypatch.setattr(F, "available_sources", lambda d: ["fake"])
    monkeypatch.setattr(F, "evaluate_stage", evaluate_stage)
    monkeypatch.setattr(F, "read_config", lambda d: types.SimpleNamespace(max_seq_len=512))
    monkeypatch.setattr(F, "write_report", lambda d: Path(d) / "report.md")
    for mod, name in ((sft, "sft"), (reward, "reward"), (rlhf, "rl"), (dpo, "dpo")):
        monkeypatch.setattr(mod, "run", stage(name))
    monkeypatch.setattr(dpo, "sample_pairs", lambda *a, **k: Path(a[3]).write_text("{}\n") and {"pairs": 1, "prompts": 1})
    import chatsmith.reward_model as RM
    monkeypatch.setattr(RM, "load_reward_model", lambda d: types.SimpleNamespace(score=lambda convs: [0.0] * len(convs)))
    assert cli("speedrun", "--from", "smollm2", "--out", tmp_path / "run", "--minutes", 30) == 0
    train_s = 30 * 60 - 4 * eval_s - F.REWARD_EVAL_S - F.RESERVE_S
    assert set(budgets) == set(F.SHARES)
    assert caps["dpo"] == 1  # DPO_EPOCHS passes over the one on-policy pair, batch 4: one step at most
    for name, share in F.SHARES.items():
        assert budgets[name] == pytest.approx(share * train_s, rel=0.01), name
    res = json.loads((tmp_path / "run" / "speedrun.json").read_text())
    assert [r["stage"] for r in res["chain"]] == ["base", "sft", "rl", "dpo"]
    assert res["judge"]["dpo_vs_sft"]["win_rate"] == 0.5  # equal scores: every prompt a tie
    # the whole run, by the fake clock, within the budget (the judge and report take no time here)
    assert res["seconds"] <= 30 * 60 - F.RESERVE_S + 1


def test_dtype_auto_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch):
    """--dtype auto trains a pretrained model under bf16 autocast where the CPU does bf16 in hardware
    (2x faster there), never where PyTorch would emulate it; an explicit --dtype is kept; the eval
    budget estimate counts the faster scoring only when bf16 is native."""
    from types import SimpleNamespace

    a = lambda dtype: SimpleNamespace(dtype=dtype, device="cpu")  # noqa: E731
    monkeypatch.setattr(F, "cpu_has_native_bf16", lambda: True)
    assert F.resolve_dtype(a("auto")) == "bf16"
    assert F.resolve_dtype(a("fp32")) == "fp32"
    monkeypatch.setattr(F, "cpu_has_native_bf16", lambda: False)
    assert F.resolve_dtype(a("auto")) == "auto"
    slow = F.fixed_seconds(50, True, True)
    assert F.fixed_seconds(50, True, True, decode="int8", bf16_scoring=True) < slow
    assert F.fixed_seconds(50, True, True, decode="bf16") < slow


def test_decode_weights_follow_the_dtype_and_bf16_is_refused_without_hardware(monkeypatch, tmp_path):
    """--eval-quantize auto: bf16 decode weights (evaluations, RL rollouts, DPO's pairs) exactly when
    the run is bf16 on a CPU with native bf16; an explicit choice is kept; bf16 asked for on a CPU
    that would emulate it stops before anything is written, naming the flag."""
    from types import SimpleNamespace

    a = lambda dtype, q="auto": SimpleNamespace(dtype=dtype, device="cpu", eval_quantize=q)  # noqa: E731
    monkeypatch.setattr(F, "cpu_has_native_bf16", lambda: True)
    assert F.resolve_decode(a("bf16")) == "bf16"
    assert F.resolve_decode(a("fp32")) == "none"
    assert F.resolve_decode(a("bf16", "int8")) == "int8"
    monkeypatch.setattr(F, "cpu_has_native_bf16", lambda: False)
    assert F.resolve_decode(a("bf16")) == "none"
    args = SimpleNamespace(out=str(tmp_path / "run"), resume=False, name="Smith", eval_items=20, steps=None,
                           eval_quantize="bf16", dtype="fp32", device="cpu", minutes=30, data=None,
                           sources_dir=str(tmp_path))
    with pytest.raises(UserError, match="--eval-quantize bf16: this CPU has no native bf16"):
        F.check_flags(args)
    assert not (tmp_path / "run").exists()
