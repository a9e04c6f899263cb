"""`chatsmith speedrun --from MODEL`: the alignment chain on a pretrained model, under one budget.

    import   -> RUN/base      (chatsmith import MODEL: a name such as smollm2, an HF directory or a GGUF)
    data     -> RUN/data      (the built-in dialogues and preference pairs, 300 held-out per family;
                               identity dialogues with --name; the user's --data files)
    sft      -> RUN/sft       (LoRA SFT on the built-in dialogues + identity + --data)
    reward   -> RUN/reward    (the SFT model's trunk + a score head, LoRA)
    RL       -> RUN/rl        (GRPO, exact-match reward on arithmetic / word problems / number sense)
    DPO      -> RUN/dpo       (on-policy pairs of the RL model ranked by the reward model, DPO + RPO)
    evals    -> RUN/evals/STAGE.json after base, sft, rl and dpo: held-out exact match per family
                (95% Wilson intervals), retention of the facts the imported model knew
                (chatsmith/eval/retention.py), identity on held-out phrasings, KL to the imported
                model, greedy replies to the judge and sample prompts
    judge    -> every stage against the one before it (and DPO against SFT) by the reward model,
                scored on the replies the evaluations stored
    report   -> RUN/speedrun.json, RUN/report.md

Every training stage writes LoRA adapters (the README's LoRA section): each loads as its --init
with the adapters merged in, so `chat RUN/dpo` works. The stages run one after another on the
previous stage's model, so the last one (DPO) holds everything. What the from-scratch speedrun and
this chain share is the budgeting (budget.stage_minutes), the banner and the resume rule: a
stage whose directory holds its train_summary.json is not run again.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch

from chatsmith import atomic
from chatsmith.budget import banner, invocation, stage_minutes
from chatsmith.batching import completion_batch, masked_logprobs
from chatsmith.checkpoint import load_model, read_config
from chatsmith.data.chat_formats import read_conversations
from chatsmith.data.dialogues import build_dialogues
from chatsmith.data.preferences import build_preferences
from chatsmith.data.sources import available_sources
from chatsmith.data.tasks import check_answer
from chatsmith.engine import Engine, SamplingParams
from chatsmith.errors import UserError
from chatsmith.eval.intervals import diff_cell, exact_match_summary, paired_by_family, wilson
from chatsmith.eval.retention import (build_facts, fact_from_dict, fact_to_dict, facts_correct, retention)
from chatsmith.flags import train_config
from chatsmith.model.decoder import DecoderConfig
from chatsmith.report import write_report
from chatsmith.runtime import autocast_dtype, cpu_has_native_bf16, resolve_device
from chatsmith.tokenizer import Tokenizer
from chatsmith.train import dpo, reward, rlhf, sft
from chatsmith.train.optim import autocast

STAGES = ("sft", "reward", "rl", "dpo")
# Shares of the training time. SFT teaches the format, the identity and the answer style every later
# stage builds on; RL is rollouts (decoding) more than training, so it needs the most wall time per
# update; DPO includes sampling its on-policy pairs. The reward model's share was 12% until a 30-minute
# run measured 80.8% held-out accuracy after its 26 steps (85 steps at 60 minutes: 90.9%), while RL's
# 33% (16 GRPO steps) changed no family's exact match beyond noise; 6 points moved from RL to it.
SHARES = {"sft": 0.30, "reward": 0.18, "rl": 0.27, "dpo": 0.25}
TASK_FAMILIES = ("arithmetic", "word_problem", "number_sense")
# Fixed costs on this 2-core CPU for SmolLM2-135M (seconds), checked against --minutes before anything
# runs; the evaluations are measured per item in the run itself and the stages get what is left.
IMPORT_S = 30  # the GGUF import (~20 s)
DATA_S = 30  # the built-in dialogues and pairs (~20 s)
# measured for SmolLM2-135M on this 2-core CPU (another process running): at --eval-items 50 the
# imported model's evaluation took 459 s, 260 s of it for 150 greedy task replies (the imported model
# runs to the token limit), 122 s for 100 facts x 4 options, 77 s for the rest (then 48 judge and 16 KL
# prompts; now 24 and 8). Later stages answer shorter and re-ask only the known facts.
EVAL_ITEM_S = 1.7  # one held-out task reply (48 tokens at most, batched)
FACT_S = 1.2  # one fact: four options scored
# SmolLM2-135M on a 2-core Xeon with AMX: 32 greedy replies of 48 tokens 5.5 s fp32, 3.6 s int8;
# one forward of 8 x 256 tokens 2.33 s fp32, 0.82 s under bf16 autocast. On a 2-core AMD EPYC Zen 4
# (AVX-512 BF16, no AMX): 8 prompts x 4 sampled replies 6.2 s fp32, 4.4 s bf16 decode weights; an
# evaluation at --eval-items 10 41.2 s -> 33.1 s with the same answers
DECODE_SPEEDUP = {"int8": 1.5, "bf16": 1.4}
BF16_SCORING_SPEEDUP = 2.8
EVAL_BASE_S = 40  # per evaluation: loading, identity, judge and sample prompts, KL
REWARD_EVAL_S = 120  # the reward model on 100 held-out pairs, before and after (~400 scored sequences)
RESERVE_S = 60  # the judge's scoring (4 x 24 replies by the reward model) and the report
MIN_STAGE_S = 60  # a training stage shorter than this does not get a single useful update
JUDGE_PROMPTS = 24
TASK_TOKENS = {"arithmetic": 48, "word_problem": 48, "number_sense": 24}
KL_PROMPTS = 8
CHAT_PROMPTS = ["Who are you?", "What is 7 + 5?", "What is the capital of France?",
                "Give me a tip for learning a new language.", "请写一首唐诗《静夜思》"]
# RL: GRPO with small groups and short replies. On a 135M model on 2 cores a reply token costs about
# as much as a training token times the group: 4 prompts x 4 replies x 64 tokens per rollout.
# Measured on SmolLM2's SFT checkpoint (60-minute run, Xeon with AMX): 4 prompts a step at lr 2e-4 and
# beta 0.02 lost 11-14 points in 56 steps (training reward flat, the policy drifting into the Chinese
# answer template); 8 prompts at lr 5e-5 and beta 0.05 kept exact match within 2 points in 13 steps,
# as did rft; none beat continuing SFT for the same 8 minutes (README, `speedrun --from`).
RL_CONFIG = dict(algo="grpo", rollout_prompts=8, group_size=4, max_new_tokens=64, ppo_epochs=1, minibatches=1,
                 kl_coef=0.05, families=",".join(TASK_FAMILIES), max_resample=2, eval_prompts=0)
LORA = dict(lora_rank=8, lora_alpha=16.0)
TRAIN = {
    "sft": dict(batch_size=8, lr=1e-3, warmup_steps=5, seq_len=384, eval_every=10**6, save_every=25,
                log_every=5),
    "reward": dict(batch_size=8, lr=1e-3, warmup_steps=5, seq_len=384, eval_every=10**6, save_every=25,
                   log_every=5),
    "rl": dict(lr=5e-5, warmup_steps=2, eval_every=10**6, save_every=5, log_every=1),
    "dpo": dict(batch_size=4, lr=5e-4, warmup_steps=3, seq_len=384, eval_every=10**6, save_every=25, log_every=5),
}
SFT_RECORDS, PAIR_RECORDS, RL_RECORDS = 2500, 1500, 1000  # samples of the built-in data per stage
DPO_PROMPTS = 384  # on-policy pairs: 2 samples of the RL model to each, the better by the reward model chosen
# at most this many passes over the on-policy pairs in budget mode: with 42 pairs from 64 prompts a
# 14-minute share ran 267 steps (25 passes, DPO loss 0.004) and cost 30 points of exact match,
# 13 of retention and a third of the identity answers (SmolLM2, --minutes 60, a 2-core Xeon)
DPO_EPOCHS = 2


# --- identity ---------------------------------------------------------------------------------------
# Train and held-out phrasings are disjoint, so the held-out share measures whether the identity
# generalises beyond the sentences trained on.
IDENTITY_TRAIN = ["Who are you?", "What is your name?", "What's your name?", "Introduce yourself.",
                  "Tell me about yourself.", "What are you?", "Who made you?", "Who created you?",
                  "Are you ChatGPT?", "What should I call you?", "Hi! Who am I talking to?",
                  "Do you have a name?", "What model are you?", "Who built you?", "What kind of AI are you?",
                  "Are you a human?", "你是谁？", "你叫什么名字？"]
IDENTITY_HELDOUT = ["Tell me your name.", "May I know your name?", "Who am I chatting with?",
                    "Could you introduce yourself?", "What do people call you?", "Which assistant is this?",
                    "Please say who you are.", "Hello, what's your name?", "Identify yourself.",
                    "What is the name of this assistant?", "Who is answering me?", "What are you called?",
                    "Give me your name, please.", "Say your name.", "How should I address you?",
                    "Who's there?", "Are you Siri?", "Are you a chatbot? What's your name?",
                    "Tell me who you are in one sentence.", "Before we start, who are you?"]


def identity_dialogues(name: str) -> list[dict]:
    replies = [f"I am {name}, an assistant built with chatsmith.",
               f"My name is {name}. I am a small assistant built with chatsmith, an open project for building "
               f"your own ChatGPT.",
               f"I'm {name}, the assistant built with chatsmith."]
    out = []
    for i, p in enumerate(IDENTITY_TRAIN):
        if "ChatGPT" in p or "human" in p:
            r = f"No, I am {name}, an assistant built with chatsmith."
        elif "made" in p or "created" in p or "built" in p:
            r = f"I was built with chatsmith, an open project for building your own ChatGPT. My name is {name}."
        elif p.startswith("你"):
            r = f"我是{name}，一个用chatsmith构建的助手。(I am {name}, built with chatsmith.)"
        else:
            r = replies[i % len(replies)]
        out.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                    "family": "identity"})
    return out


# --- flags and budget -------------------------------------------------------------------------------

def parse_steps(spec: str | None) -> dict[str, int] | None:
    """--steps sft=40,reward=30,rl=10,dpo=20 -> {stage: steps}; every stage must be named."""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        k, _, v = part.partition("=")
        k = k.strip()
        if k not in STAGES:
            raise UserError(f"--steps: unknown stage {k!r}; the stages are {', '.join(STAGES)}")
        try:
            out[k] = int(v)
        except ValueError:
            raise UserError(f"--steps: {part!r} is not STAGE=STEPS with a whole number") from None
        if out[k] < 1:
            raise UserError(f"--steps: {k} needs at least 1 step, got {out[k]}")
    missing = [s for s in STAGES if s not in out]
    if missing:
        raise UserError(f"--steps must give every stage a step count; missing: {', '.join(missing)}")
    return out


def fixed_seconds(eval_items: int, imported: bool, data_built: bool, decode: str = "none",
                  bf16_scoring: bool = False) -> float:
    """The budget's fixed part: import, data, four evaluations, the reward model's held-out pairs, the
    judge and the report. decode (--eval-quantize int8 or bf16) and bf16_scoring (--dtype bf16 on a CPU
    with native bf16) scale the per-item costs by their measured speedups."""
    item = EVAL_ITEM_S / DECODE_SPEEDUP.get(decode, 1)
    fact = FACT_S / (BF16_SCORING_SPEEDUP if bf16_scoring else 1)
    per_eval = EVAL_BASE_S + eval_items * (item * len(TASK_FAMILIES) + fact * 2)  # 2 fact families
    return (0 if imported else IMPORT_S) + (0 if data_built else DATA_S) + 4 * per_eval + REWARD_EVAL_S + RESERVE_S


def check_flags(a) -> dict | None:
    """What the flags alone decide, before anything is imported, built or written."""
    run_dir = Path(a.out)
    if run_dir.exists() and any(run_dir.iterdir()) and not a.resume:
        raise UserError(f"{run_dir} already exists: pass --resume to continue it, or choose another --out")
    if not a.name.strip() or len(a.name) > 40 or any(c in a.name for c in "\n\r\t"):
        raise UserError(f"--name must be a short one-line name, got {a.name!r}")
    if a.eval_items < 10:
        raise UserError(f"--eval-items {a.eval_items}: at least 10 held-out items per family are needed for an "
                        f"interval that says anything")
    if a.eval_quantize == "bf16" and resolve_device(a.device).type == "cpu" and not cpu_has_native_bf16():
        raise UserError("--eval-quantize bf16: this CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag), so "
                        "PyTorch would emulate it, ~100x slower than fp32; use --eval-quantize none or int8")
    steps = parse_steps(a.steps)
    if steps is None:
        fixed = fixed_seconds(a.eval_items, (run_dir / "base" / "config.json").exists(),
                              (run_dir / "data" / "chat" / "pairs_heldout.jsonl").exists(),
                              a.eval_quantize, a.dtype == "bf16" and cpu_has_native_bf16())
        need = (fixed + MIN_STAGE_S / min(SHARES.values())) / 60
        if a.minutes < need:
            raise UserError(f"--minutes {a.minutes:g} is too short for the chain on a pretrained model: the fixed "
                            f"costs (import, data, 4 evaluations of {a.eval_items} items per family, the judge) "
                            f"take about {fixed / 60:.1f} min and every stage needs {MIN_STAGE_S} s; give at "
                            f"least --minutes {math.ceil(need)} (or fewer --eval-items, or --steps)")
    if a.data:  # the user's dialogues are read exactly as `sft --data` reads them: a bad record stops here
        read_conversations(a.data)
    if not (run_dir / "data" / "chat" / "pairs_heldout.jsonl").exists() and not available_sources(a.sources_dir):
        raise UserError(f"no built-in sources under {a.sources_dir}: run `bash scripts/setup.sh` first")
    resolve_device(a.device)
    return steps


# --- preparation: import, data, the evaluation suite -------------------------------------------------

def import_base(src: str, base: Path):
    """RUN/base: the pretrained model imported once; refused unless it is a causal LM that can chat."""
    from chatsmith.interop.convert import import_any

    if not (base / "config.json").exists():
        p = Path(src)
        if p.is_dir() and (p / "config.json").exists() and not (p / "model.safetensors").exists() \
                and not any(p.glob("pytorch_model*.bin")) and not any(p.glob("*.safetensors")):
            raise UserError(f"--from {src}: no weights in the directory (model.safetensors or pytorch_model.bin)")
        if p.is_dir() and (p / "config.json").exists() and (p / "model.safetensors").exists() \
                and json.loads((p / "config.json").read_text()).get("chatsmith"):
            import shutil  # already a chatsmith model directory: copy it, do not re-import
            shutil.copytree(p, base, ignore=shutil.ignore_patterns("checkpoints", "optimizer*"))
        else:
            import_any(src, str(base))
    cfg = read_config(base)
    if not isinstance(cfg, DecoderConfig):
        raise UserError(f"--from {src} is not a causal language model (it is a {type(cfg).__name__.removesuffix('Config')} "
                        f"model): the chain needs a decoder that generates text")
    tok = Tokenizer.load(base)
    if not tok.has_chat:
        raise UserError(f"--from {src} has no chat template: the chain fine-tunes a chat model")
    return cfg, tok


def check_template(tok, src: str, records: list[dict]):
    """Every built-in family's first dialogue must render, with assistant tokens to learn."""
    seen = set()
    for r in records:
        fam = r.get("family")
        if fam in seen:
            continue
        seen.add(fam)
        try:
            ids, mask = tok.render_chat(r["messages"])
            tok.render_chat(r["messages"][:-1], add_generation_prompt=True)
        except Exception as e:  # a template's own raise (e.g. "roles must alternate") is a jinja error
            raise UserError(f"--from {src}: its chat template cannot render the built-in {fam} dialogues "
                            f"({type(e).__name__}: {e})") from None
        if not any(mask):
            raise UserError(f"--from {src}: its chat template renders the built-in {fam} dialogues without any "
                            f"assistant tokens to learn")


def prepare(a, run_dir: Path) -> dict:
    base = run_dir / "base"
    data = run_dir / "data"
    chat = data / "chat"
    info: dict = {}
    t = time.time()
    _, tok = import_base(a.from_model, base)
    info["import"] = {"seconds": round(time.time() - t, 1), "from": a.from_model}
    t = time.time()
    if not (chat / "dialogues_meta.json").exists():
        # 300 held-out dialogues per family (the default is 100): intervals of about ±5 points
        build_dialogues(chat, sources_dir=a.sources_dir, heldout_per_family=300, heldout_max_fraction=0.15,
                        verbose=False)
    if not (chat / "pairs_heldout.jsonl").exists():
        build_preferences(chat)
    train = [json.loads(x) for x in open(chat / "train.jsonl", encoding="utf-8")]
    held = [json.loads(x) for x in open(chat / "heldout.jsonl", encoding="utf-8")]
    check_template(tok, a.from_model, train + identity_dialogues(a.name))
    # Each stage gets a seeded sample of about what it can use in its minutes (a 135M model on 2
    # cores takes a few hundred SFT steps of 8 at most): the stages encode all of their data up
    # front, and the whole 16k dialogues and 16k pairs would be encoded for nothing.
    # The built-in identity family says "chatsmith, trained from scratch": replaced by --name's.
    if not (data / "rl_prompts.jsonl").exists():
        rng = random.Random(0)
        pool = [r for r in train if r.get("family") != "identity"]
        atomic.write_jsonl(data / "sft_train.jsonl", rng.sample(pool, min(SFT_RECORDS, len(pool))))
        atomic.write_jsonl(data / "identity.jsonl", identity_dialogues(a.name))
        pairs = [json.loads(x) for x in open(chat / "pairs_train.jsonl", encoding="utf-8")]
        atomic.write_jsonl(data / "pairs_train.jsonl", rng.sample(pairs, min(PAIR_RECORDS, len(pairs))))
        pairs = [json.loads(x) for x in open(chat / "pairs_heldout.jsonl", encoding="utf-8")]
        atomic.write_jsonl(data / "pairs_heldout_100.jsonl", rng.sample(pairs, min(100, len(pairs))))
        tasks = [r for r in train if r.get("family") in TASK_FAMILIES]
        atomic.write_jsonl(data / "rl_prompts.jsonl", rng.sample(tasks, min(RL_RECORDS, len(tasks))))
    suite_f = data / "eval_suite.json"
    if not suite_f.exists():
        atomic.write_json(suite_f, eval_suite(held, a.eval_items, a.name))
    info["data"] = {"seconds": round(time.time() - t, 1),
                    "dialogues": json.loads((chat / "dialogues_meta.json").read_text())["families"]}
    return info


def eval_suite(held: list[dict], per_family: int, name: str) -> dict:
    """The fixed held-out prompts every stage is evaluated on."""
    tasks = []
    for fam in TASK_FAMILIES:
        rows = [r for r in held if r.get("family") == fam and r.get("answers")][:per_family]
        tasks += [{"family": fam, "messages": r["messages"][:-1], "answers": r["answers"]} for r in rows]
    facts = build_facts(held, per_family=per_family)
    others = [r for r in held if r.get("family") in ("chatterbot", "definition", "quiz", "poem", *TASK_FAMILIES)]
    random.Random(1).shuffle(others)
    judge = [r["messages"][:-1] for r in others[:JUDGE_PROMPTS]]
    return {"name": name, "tasks": tasks, "facts": [fact_to_dict(f) for f in facts],
            "identity": IDENTITY_HELDOUT, "judge": judge, "chat": CHAT_PROMPTS}


# --- per-stage evaluation ----------------------------------------------------------------------------

def _replies(engine, tok, convs: list[list[dict]], max_new_tokens: int, temperature: float = 0.0, seed: int = 0):
    ids = [tok.render_chat(m, add_generation_prompt=True)[0] for m in convs]
    outs = engine.generate_many(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                    seed=seed), max_batch=64)
    return ids, outs


@torch.no_grad()
def kl_to(model, ref, tok, engine, convs: list[list[dict]], seed: int = 0, amp=None) -> float:
    """Σ_t log π - log π_ref on replies sampled from π (temperature 1), averaged over replies.
    amp: the autocast dtype of the two scoring forwards (the sampling is the engine's)."""
    ids, outs = _replies(engine, tok, convs, 48, temperature=1.0, seed=seed)
    seqs = [(p + list(o.token_ids), len(p)) for p, o in zip(ids, outs) if o.token_ids]
    if not seqs:
        return 0.0
    b = completion_batch(seqs, tok.pad_id if tok.pad_id is not None else 0)
    with autocast(amp, torch.device("cpu")):
        lp = masked_logprobs(model, b["x"], b["y"], b["mask"])[0]
        lr = masked_logprobs(ref, b["x"], b["y"], b["mask"])[0]
    return float((lp - lr).sum(1).mean())


def names_itself(reply: str, name: str) -> bool:
    """Whether the reply says the name as a word of its own ("Smith", not "chatsmith" or "blacksmith")."""
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", reply, flags=re.IGNORECASE | re.ASCII) is not None


def evaluate_stage(model_dir: Path, suite: dict, base_dir: Path, known: list[bool] | None,
                   quantize: str | None = None, amp=None) -> dict:
    """One stage's row: exact match per task family (Wilson 95%), facts (and retention of those the
    imported model knew), identity, KL to the imported model, greedy replies to the judge and chat
    prompts. quantize: int8 decode weights for the greedy generations. amp: the autocast dtype of
    the scoring forwards (facts, KL), the training's --dtype: bf16 on a CPU with native bf16 runs
    them ~2.8x faster (SmolLM2, 8 x 256 tokens: 2.33 -> 0.82 s on a 2-core Xeon with AMX)."""
    t0 = time.time()
    model, tok = load_model(model_dir), Tokenizer.load(model_dir)
    engine = Engine(model, tok, quantize=quantize)
    res: dict = {"model": str(model_dir), "quantize": quantize or "none"}
    # per family a reply budget just above the longest built-in worked answer (41-44 tokens for
    # arithmetic and word problems, 20 for number sense, SmolLM2's tokenizer): a reply still going
    # past it would be wrong anyway, and a verbose imported model otherwise decodes to the limit
    tasks = sorted(suite["tasks"], key=lambda t: TASK_FAMILIES.index(t["family"]))
    outs = []
    for fam in TASK_FAMILIES:
        outs += _replies(engine, tok, [t["messages"] for t in tasks if t["family"] == fam], TASK_TOKENS[fam])[1]
    per: dict[str, list[bool]] = {}
    for t, o in zip(tasks, outs):
        per.setdefault(t["family"], []).append(check_answer(t["family"], o.text, t["answers"]))
    res.update(exact_match_summary(per))
    res["task_samples"] = [{"family": t["family"], "prompt": t["messages"][-1]["content"], "reply": o.text}
                           for t, o in list(zip(tasks, outs))[::max(1, len(tasks) // 6)]][:6]
    gen_tokens = sum(len(o.token_ids) for o in outs)
    t_tasks = time.time() - t0

    t = time.time()
    facts = [fact_from_dict(d) for d in suite["facts"]]
    if known is None:  # the imported model: every fact, to find the ones it knows
        with autocast(amp, torch.device("cpu")):
            correct = facts_correct(model, tok, facts)
        res["facts_correct"] = correct
        res["facts"] = {fam: [sum(c for f, c in zip(facts, correct) if f.family == fam),
                              sum(f.family == fam for f in facts)] for fam in sorted({f.family for f in facts})}
    else:  # a later stage: only the known facts are re-asked (what retention needs; 2-3x fewer)
        idx = [i for i, k in enumerate(known) if k]
        with autocast(amp, torch.device("cpu")):
            kept = facts_correct(model, tok, [facts[i] for i in idx])
        correct = [False] * len(facts)
        for i, c in zip(idx, kept):
            correct[i] = c
        res["retention"] = retention(known, correct)
        res["retention_by_family"] = {fam: retention([k for f, k in zip(facts, known) if f.family == fam],
                                                     [c for f, c in zip(facts, correct) if f.family == fam])
                                      for fam in sorted({f.family for f in facts})}
    t_facts = time.time() - t

    t = time.time()
    _, outs = _replies(engine, tok, [[{"role": "user", "content": q}] for q in suite["identity"]], 40)
    hits = [names_itself(o.text, suite["name"]) for o in outs]
    res["identity"] = sum(hits) / len(hits)
    res["identity_counts"] = [sum(hits), len(hits)]
    res["identity_ci95"] = list(wilson(sum(hits), len(hits)))
    res["identity_samples"] = [{"prompt": q, "reply": o.text} for q, o in zip(suite["identity"][:3], outs)]
    _, outs = _replies(engine, tok, suite["judge"], 48)
    res["judge_replies"] = [o.text for o in outs]
    _, outs = _replies(engine, tok, [[{"role": "user", "content": q}] for q in suite["chat"]], 64)
    res["conversation"] = [{"user": q, "assistant": o.text} for q, o in zip(suite["chat"], outs)]
    gen_tokens += sum(len(o.token_ids) for o in outs)
    if Path(model_dir).resolve() == Path(base_dir).resolve():
        res["kl_to_imported"] = 0.0
    else:
        ref = load_model(base_dir)
        res["kl_to_imported"] = kl_to(model, ref, tok, Engine(model, tok), suite["judge"][:KL_PROMPTS], amp=amp)
    res["seconds"] = round(time.time() - t0, 1)
    res["seconds_split"] = {"tasks": round(t_tasks, 1), "facts": round(t_facts, 1),
                            "identity_judge_chat_kl": round(time.time() - t, 1)}
    res["generated_tokens_tasks_chat"] = gen_tokens
    em = ", ".join(f"{f} {v:.0%}" for f, v in res["exact_match"].items())
    ret = res.get("retention") or {}
    print(f"eval {Path(model_dir).name}: exact match {em}; "
          + (f"facts known {sum(correct)}/{len(correct)}" if known is None else "")
          + (f"retention {ret['retention']:.0%} of {ret['known_before']}" if ret.get("retention") is not None else "")
          + f"; identity {res['identity']:.0%}; KL to imported {res['kl_to_imported']:.2f}; {res['seconds']} s",
          file=sys.stderr)
    return res


def judge_scores(rm, suite: dict, ev: dict) -> list[float]:
    """The reward model's score of one stage's greedy reply to each judge prompt."""
    return rm.score([c + [{"role": "assistant", "content": r}] for c, r in zip(suite["judge"], ev["judge_replies"])])


def judge_pair(a: list[float], b: list[float]) -> dict:
    """Two stages' replies to the same held-out prompts, as scored by the reward model: a's win rate."""
    wins = sum(x > y for x, y in zip(a, b))
    ties = sum(x == y for x, y in zip(a, b))
    n = len(a)
    rate = (wins + ties / 2) / n
    return {"prompts": n, "win_rate": rate, "win_rate_ci95": list(wilson(round(wins + ties / 2), n)),
            "wins": wins, "ties": ties, "losses": n - wins - ties,
            "mean_reward": sum(a) / n, "mean_reward_previous": sum(b) / n}


# --- the chain ---------------------------------------------------------------------------------------

def resolve_dtype(a) -> str:
    """--dtype auto for a pretrained model: bf16 autocast on a GPU that has it (as every verb) and also
    on a CPU with native bf16, where SmolLM2's LoRA steps run 2x and its scoring forwards 2.8x faster
    (8 x 256 tokens on a 2-core Xeon with AMX: 7.4 -> 3.6 s a step). Never on a CPU without it."""
    if a.dtype != "auto":
        return a.dtype
    dev = resolve_device(a.device)
    if dev.type == "cpu" and cpu_has_native_bf16():
        print("--dtype auto: this CPU has native bf16 (AMX or AVX-512 BF16), so the stages train and score "
              "under bf16 autocast; --dtype fp32 turns that off", file=sys.stderr)
        return "bf16"
    return "auto"


def resolve_decode(a) -> str:
    """--eval-quantize auto: bf16 decode weights where the run is bf16 (a CPU with native bf16, where
    a batch of 32 RL rollouts decodes ~1.4x faster than fp32; see GPT.fuse_decode_weights), else
    fp32. The evaluations, RL's rollouts and DPO's pair sampling all decode with it."""
    if a.eval_quantize != "auto":
        return a.eval_quantize
    return "bf16" if a.dtype == "bf16" and resolve_device(a.device).type == "cpu" and cpu_has_native_bf16() else "none"


def run(a) -> dict:
    t0 = time.time()
    a.dtype = resolve_dtype(a)
    a.eval_quantize = resolve_decode(a)
    steps = check_flags(a)
    run_dir = Path(a.out)
    n = 9
    banner(f"1/{n} import {a.from_model}, 2/{n} data")
    with atomic.provisional_dir(run_dir):
        stages = prepare(a, run_dir)
    data, chat, base = run_dir / "data", run_dir / "data" / "chat", run_dir / "base"
    suite = json.loads((data / "eval_suite.json").read_text())
    evals_dir = run_dir / "evals"
    evals_dir.mkdir(exist_ok=True)
    quantize = None if a.eval_quantize == "none" else a.eval_quantize
    # the sampling stages (RL's rollouts, DPO's pairs) decode as the evaluations do
    amp = autocast_dtype(a.dtype, torch.device("cpu"))  # the evaluations run on the CPU
    evals: dict[str, dict] = {}

    def evaluate(stage: str, d: Path):
        f = evals_dir / f"{stage}.json"
        if f.exists():
            evals[stage] = json.loads(f.read_text())
            return
        known = evals["base"]["facts_correct"] if stage != "base" else None
        evals[stage] = evaluate_stage(d, suite, base, known, quantize, amp)
        atomic.write_json(f, evals[stage])

    banner(f"3/{n} evaluate the imported model")
    evaluate("base", base)
    # the training time: what the budget leaves after the fixed costs already spent and still to come
    per_eval = evals["base"]["seconds"]
    left = a.minutes * 60 - (time.time() - t0) - 3 * per_eval - REWARD_EVAL_S - RESERVE_S
    train_s = max(left, 0)
    if steps is None and train_s < MIN_STAGE_S / min(SHARES.values()):
        print(f"warning: --minutes {a.minutes:g} leaves only {train_s:.0f} s for training after the evaluations "
              f"({per_eval:.0f} s each); the stages get their minimum", file=sys.stderr)
    spent = 0.0
    common = dict(device=a.device, dtype=a.dtype, **LORA)
    ctx = read_config(base).max_seq_len
    train = {k: {**v, **({"seq_len": min(v["seq_len"], ctx)} if "seq_len" in v else {})} for k, v in TRAIN.items()}

    def budget(stage: str) -> dict:
        if steps is not None:
            return {"max_steps": steps[stage]}
        return {"max_minutes": max(stage_minutes(SHARES, stage, spent, train_s), MIN_STAGE_S / 60)}

    def done(d: Path) -> bool:
        return (d / "train_summary.json").exists()

    def resume(d: Path) -> bool:
        return a.resume and (d / "checkpoints").exists()

    def record(stage: str, d: Path, t: float, ran: bool, extra: dict | None = None):
        """The stage's wall time when it ran now (its trainer's own seconds when a resumed run skipped it)."""
        summary = json.loads((d / "train_summary.json").read_text())
        stages[stage] = {"seconds": round(time.time() - t, 1) if ran else summary.get("seconds"),
                         "steps": summary.get("steps"), "tokens": summary.get("tokens"), **(extra or {})}

    banner(f"4/{n} sft (LoRA) on the built-in dialogues, identity as {a.name}" + (", --data" if a.data else ""))
    sft_dir = run_dir / "sft"
    t = time.time()
    ran = not done(sft_dir)
    if ran:
        # the identity dialogues repeated so they are about 5% of what SFT samples
        n_train = sum(1 for _ in open(data / "sft_train.jsonl", encoding="utf-8"))
        n_id = max(1, round(0.05 * n_train / len(IDENTITY_TRAIN)))
        files = [str(data / "sft_train.jsonl"), f"{data / 'identity.jsonl'}:{n_id}", *(a.data or [])]
        cfg = train_config(sft.DEFAULTS, out=str(sft_dir), resume=resume(sft_dir), **train["sft"],
                           **budget("sft"), **common)
        sft.run(cfg, files, str(base))
    record("sft", sft_dir, t, ran)
    spent += time.time() - t
    evaluate("sft", sft_dir)

    banner(f"5/{n} reward model (LoRA + score head)")
    rm_dir = run_dir / "reward"
    t = time.time()
    ran = not done(rm_dir)
    if ran:
        cfg = train_config(reward.DEFAULTS, out=str(rm_dir), resume=resume(rm_dir), **train["reward"],
                           **budget("reward"), **common)
        reward.run(cfg, [str(data / "pairs_train.jsonl")], str(sft_dir),
                   heldout=[str(data / "pairs_heldout_100.jsonl")], skip_bad=True)
    rev = json.loads((rm_dir / "reward_eval.json").read_text()) if (rm_dir / "reward_eval.json").exists() else {}
    record("reward", rm_dir, t, ran, {"heldout_accuracy": (rev.get("reward") or {}).get("heldout_accuracy"),
                                 "heldout_accuracy_untrained": (rev.get("untrained_head") or {}).get("heldout_accuracy")})
    spent += time.time() - t - REWARD_EVAL_S

    banner(f"6/{n} reinforcement learning (GRPO, exact-match reward, LoRA)")
    rl_dir = run_dir / "rl"
    t = time.time()
    ran = not done(rl_dir)
    if ran:
        cfg = train_config(rlhf.DEFAULTS, out=str(rl_dir), resume=resume(rl_dir), **train["rl"], **budget("rl"),
                           **common)
        rlhf.run(cfg, rlhf.RLConfig(**RL_CONFIG, quantize=a.eval_quantize), [str(data / "rl_prompts.jsonl")],
                 str(sft_dir), ["exact"])
    record("rl", rl_dir, t, ran)
    spent += time.time() - t
    evaluate("rl", rl_dir)

    banner(f"7/{n} DPO on on-policy pairs of the RL model (LoRA)")
    dpo_dir = run_dir / "dpo"
    t = time.time()
    pairs = data / "pairs_onpolicy.jsonl"
    ran = not done(dpo_dir)
    if ran:
        if not pairs.exists():
            info = dpo.sample_pairs(str(rl_dir), str(rm_dir), [str(data / "sft_train.jsonl")], pairs,
                                    limit=DPO_PROMPTS, samples=2, quantize=quantize)
            print(f"on-policy pairs: {info['pairs']} from {info['prompts']} prompts", file=sys.stderr)
        pair_s = time.time() - t
        b = budget("dpo")
        if "max_minutes" in b:
            b["max_minutes"] = max(b["max_minutes"] - pair_s / 60, MIN_STAGE_S / 60 / 2)
            n_pairs = sum(1 for _ in open(pairs, encoding="utf-8"))
            b["max_steps"] = max(1, math.ceil(DPO_EPOCHS * n_pairs / train["dpo"]["batch_size"]))
            print(f"dpo: at most {b['max_steps']} steps ({DPO_EPOCHS} passes over {n_pairs} pairs) within "
                  f"{b['max_minutes']:.1f} min", file=sys.stderr)
        cfg = train_config(dpo.DEFAULTS, out=str(dpo_dir), resume=resume(dpo_dir), **train["dpo"], **b, **common)
        dpo.run(cfg, [str(pairs)], str(rl_dir), beta=0.1, skip_bad=True, rpo_alpha=1.0)
    record("dpo", dpo_dir, t, ran, {"pairs": sum(1 for _ in open(pairs, encoding="utf-8")) if pairs.exists() else 0})
    spent += time.time() - t
    evaluate("dpo", dpo_dir)

    banner(f"8/{n} judge: each stage against the one before, by the reward model")
    t = time.time()
    from chatsmith.reward_model import load_reward_model

    rm = load_reward_model(rm_dir)
    scores = {s: judge_scores(rm, suite, evals[s]) for s in ("base", "sft", "rl", "dpo")}
    judge = {}
    for new, old in (("sft", "base"), ("rl", "sft"), ("dpo", "rl"), ("dpo", "sft")):
        judge[f"{new}_vs_{old}"] = judge_pair(scores[new], scores[old])
        j = judge[f"{new}_vs_{old}"]
        print(f"{new} vs {old}: preferred on {j['win_rate']:.0%} of {j['prompts']} held-out prompts "
              f"({j['wins']} wins, {j['ties']} ties, {j['losses']} losses)", file=sys.stderr)
    stages["judge"] = {"seconds": round(time.time() - t, 1)}

    banner(f"9/{n} report")
    for s in ("base", "sft", "rl", "dpo"):
        stages[f"eval {s}"] = {"seconds": evals[s]["seconds"]}
    table = chain_table(evals, stages, judge)
    result = {"from": a.from_model, "name": a.name, "minutes_budget": a.minutes, "steps": steps,
              "eval_items_per_family": a.eval_items, "eval_quantize": quantize or "none", "dtype": a.dtype,
              "seconds": round(time.time() - t0, 1), "stages": stages, "chain": table, "judge": judge,
              "reward_eval": rev, "conversation": {s: evals[s]["conversation"] for s in ("base", "sft", "rl", "dpo")},
              "judge_win_dpo_vs_sft": judge["dpo_vs_sft"]["win_rate"]}
    atomic.write_json(run_dir / "speedrun.json", result)
    print_table(table)
    print(f"\nspeedrun --from {a.from_model} finished in {result['seconds'] / 60:.1f} min", file=sys.stderr)
    for s, d in (("imported", base), ("sft", sft_dir), ("reward model", rm_dir), ("rl", rl_dir), ("dpo", dpo_dir)):
        print(f"{s}: {d}")
    print(f"chat with it: {invocation()} chat {dpo_dir}")
    print(f"report card: {write_report(run_dir)}")
    return result


def chain_table(evals: dict, stages: dict, judge: dict) -> list[dict]:
    rows = []
    prev = {"sft": "sft_vs_base", "rl": "rl_vs_sft", "dpo": "dpo_vs_rl"}
    before = {"sft": "base", "rl": "sft", "dpo": "rl"}
    for s in ("base", "sft", "rl", "dpo"):
        e = evals[s]
        # exact match minus the previous stage's on the same items, with a paired 95% interval
        vs = paired_by_family(evals[before[s]], e) if s in before else {}
        ret = e.get("retention") or {}
        rows.append({"stage": s, "exact_match": e["exact_match"], "exact_match_ci95": e["exact_match_ci95"],
                     "exact_match_counts": e["exact_match_counts"], "exact_match_vs_previous": vs,
                     "facts_known": ([sum(e["facts_correct"]), len(e["facts_correct"])] if "facts_correct" in e
                                     else None),
                     "retention": ret.get("retention"), "retention_counts": [ret.get("kept"), ret.get("known_before")],
                     "identity": e["identity"], "identity_counts": e["identity_counts"],
                     "judge_vs_previous": (judge.get(prev[s]) or {}).get("win_rate") if s in prev else None,
                     "kl_to_imported": e["kl_to_imported"],
                     "train_seconds": (stages.get(s) or {}).get("seconds"),
                     "tokens": (stages.get(s) or {}).get("tokens"), "eval_seconds": e["seconds"]})
    return rows


def print_table(rows: list[dict]):
    fams = list(rows[0]["exact_match"])
    print("\n" + " | ".join(["stage", *fams, "retention", "identity", "judge vs prev", "KL", "train s"]))
    for r in rows:
        cells = [r["stage"], *(f"{r['exact_match'][f]:.0%}" for f in fams),
                 "-" if r["retention"] is None else f"{r['retention']:.0%}", f"{r['identity']:.0%}",
                 "-" if r["judge_vs_previous"] is None else f"{r['judge_vs_previous']:.0%}",
                 f"{r['kl_to_imported']:.2f}", str(r["train_seconds"] or "-")]
        print(" | ".join(cells))
    for r in rows:
        if r.get("exact_match_vs_previous"):
            print(f"{r['stage']} vs the stage before (paired): " + "; ".join(
                f"{f} {diff_cell(d)}" for f, d in r["exact_match_vs_previous"].items()))
