"""`chatsmith speedrun`: the whole chain on the built-in corpus under one time budget.

    data     -> RUN/data/corpus, RUN/data/chat  (chatsmith data build: text, dialogues, preference pairs)
    BPE      -> RUN/tokenizer                   (chatsmith tokenizer train)
    base     -> RUN/base                        (chatsmith pretrain) + the n-gram baseline next to it
    chat     -> RUN/sft                         (chatsmith sft on the built-in dialogues)
    reward   -> RUN/reward                      (chatsmith reward on the built-in preference pairs)
    RL       -> RUN/rl                          (chatsmith rlhf --algo grpo --reward exact)
    DPO      -> RUN/dpo                         (chatsmith data pairs: SFT samples ranked by the reward
                                                model, then chatsmith dpo on them)
    judge    -> DPO vs SFT win rate on held-out prompts, by the reward model
    report   -> RUN/samples.txt, RUN/speedrun.json, RUN/report.md + plots

The training time left after the fixed costs (data, tokenizer, evaluations) is split between the
stages by SHARES. Each stage that already finished is skipped, so `--resume` continues an
interrupted run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from chatsmith import atomic
from chatsmith.budget import banner, invocation, stage_minutes
from chatsmith.checkpoint import list_checkpoints, load_model
from chatsmith.config import DEVICES, TRAIN_CHOICES
from chatsmith.data.corpus import build_corpus
from chatsmith.data.dialogues import build_dialogues
from chatsmith.data.preferences import build_preferences
from chatsmith.data.sources import available_sources, default_sources_dir
from chatsmith.engine import Engine, SamplingParams
from chatsmith.errors import UserError
from chatsmith.eval.intervals import RL_COMPARISONS, diff_cell
from chatsmith.eval.lm import score_documents
from chatsmith.eval.ngram import NGramLM
from chatsmith.eval.runner import run_eval
from chatsmith.flags import Verb, train_config
from chatsmith.model import registry
from chatsmith.report import invalid_utf8, write_report
from chatsmith.runtime import resolve_device
from chatsmith.tokenizer import SPECIAL_TOKENS, Tokenizer, train_command
from chatsmith.train import dpo, pretrain, reward, rlhf, sft

SAMPLE_PROMPTS = ["The history of the United States", "ROMEO. O, she doth teach", "The committee said that",
                  "床前明月光"]
RESERVE_S = 30  # left at the end for the samples, the report and the summary
# Shares of the training time (what is left after the fixed costs below). Pretraining gets the most:
# every later stage starts from it. RL had 0.10 and got 3 GRPO steps (43 s) in a 15-minute run on
# a 2-core AMD EPYC: too few to move anything, so it now gets about a fifth, taken from SFT and DPO
# (whose on-policy pairs are sampled from 300 prompts instead of 600: 110 s -> about 55 s).
SHARES = {"pretrain": 0.38, "sft": 0.24, "reward": 0.06, "rl": 0.20, "dpo": 0.12}
# --minutes 45 and more: pretraining is what limits every later stage (0.19M tokens in 15 minutes
# on this CPU), so it gets half; RL keeps a similar absolute time and more rollouts than at 15
SHARES_LONG = {"pretrain": 0.50, "sft": 0.20, "reward": 0.05, "rl": 0.17, "dpo": 0.08}
LONG_MINUTES = 45
BASELINE_S = 45  # two 3-gram models counted from the shards + scoring the whole val split three times (47 s)
SFT_EVAL_S = 45  # held-out generation before and after SFT (measured ~20-40 s for tiny on 2 cores)
REWARD_EVAL_S = 50  # the reward model on the held-out pairs before and after training (~50 s of a 91 s stage)
# greedy answers of the start, RL and control policies to 3 x 400 held-out task prompts, the KL
# estimates and the control's SFT steps (600 greedy replies took ~11 s for tiny; a 2-step rft run with 3 x 300 ~25 s)
RL_EVAL_S = 90
JUDGE_S = 15  # SFT and DPO replies to 200 held-out prompts, scored by the reward model (9-10 s, tiny and mini)
# DPO's held-out pairwise accuracy on DPO_EVAL_PAIRS of the held-out pairs: on all 612 it took 75 s
# unbudgeted at the very end of a 15-minute run (the judge, not this, decides which model is served)
DPO_EVAL_PAIRS = 200
DPO_EVAL_S = 30
SHARD_S = 25  # pretraining's tokenising of the corpus and the task text into shards (measured 25 s, 2 cores)
FIXED_S = RESERVE_S + BASELINE_S + SFT_EVAL_S + REWARD_EVAL_S + RL_EVAL_S + JUDGE_S + DPO_EVAL_S
TASK_FAMILIES = ("arithmetic", "word_problem", "number_sense")  # RL's verifiable families
# held-out prompts per task family: 400 puts a 95% interval at about ±3-5 points near 0-20%
HELDOUT_TASKS = 400
JUDGE_PER_FAMILY = 100  # the judge's and SFT's held-out file keeps every family at most this many
DPO_PAIR_PROMPTS = 300
MIX = "corpus=0.8,tasks=0.2"  # pretraining's default mixture (pretrain --mix), "none" for prose only
RL_ALGOS = ("rft", "grpo", "grpo-simple")
PREP_S = 45  # data build (~20 s on 2 cores) and the tokenizer: checked against --minutes before either runs
MIN_TRAIN_S = 120
# What the speedrun sets differently from each stage's own DEFAULTS (chatsmith/train/*.py), and why:
# every stage runs for minutes, not hours, so the base model takes a smaller batch for more steps
# and evaluations are fewer and shorter; SFT and the reward model take larger learning rates (a few
# hundred steps from a weak base model); RL and DPO evaluate once, at the end, outside the budget.
# Pretraining uses Muon for the blocks' matrices: on the tiny preset and this corpus it reached
# AdamW's final val loss in 0.50x the tokens at the same time per step (bench/optimizer.py).
SPEEDRUN = {
    "pretrain": dict(batch_size=8, lr=3e-3, warmup_steps=50, eval_every=100, eval_batches=10, save_every=100,
                     optimizer="muon"),
    "sft": dict(batch_size=16, lr=1e-3, eval_batches=10, save_every=100),
    "reward": dict(lr=3e-4, eval_every=1000, save_every=1000),
    "rl": dict(lr=1e-4, eval_every=10**6, save_every=20),
    "dpo": dict(eval_every=10**6, save_every=1000),
}
N_STAGES = 9


def shares_for(minutes: float) -> dict:
    return SHARES_LONG if minutes >= LONG_MINUTES else SHARES


# The base model's shape for the budget, measured over the whole chain on a 2-core AMD EPYC. In 15
# minutes `mini` (1.9M) takes 2-9x tiny's steps in every stage (pretraining 185 vs 85, the reward
# model 51 vs 13, DPO 99 vs 11): val bpb 2.42 vs 2.54, reward model 85% vs 79%, DPO 66% vs 56%.
# In 60 minutes `tiny` (6.9M) reached 2.13 bpb, 84.5% and 62% (bench/pretrain_shapes.py: README).
PRESET, PRESET_LONG = "mini", "tiny"


def preset_for(minutes: float, run_dir: Path | None = None) -> str:
    """The budget's shape, or, resuming a run whose pretraining has started, the shape it started
    with (a run begun before the default moved keeps its own)."""
    for ckpt in reversed(list_checkpoints(run_dir / "base")) if run_dir is not None else ():
        try:
            return json.loads((ckpt / "trainer_state.json").read_text())["train_config"]["preset"]
        except (OSError, json.JSONDecodeError, KeyError):
            continue  # unreadable: the trainer's resume skips it too and takes an older one
    return PRESET_LONG if minutes >= LONG_MINUTES else PRESET


def judge_file(chat: Path) -> Path:
    """data/chat/heldout_judge.jsonl: the held-out records with each family capped at
    JUDGE_PER_FAMILY (file order; the split is shuffled), so the judge and SFT's held-out loss see
    the families in the proportions they had before the task families grew to HELDOUT_TASKS."""
    out = chat / "heldout_judge.jsonl"
    if not out.exists():
        seen: dict[str, int] = {}
        keep = []
        for line in (chat / "heldout.jsonl").read_text(encoding="utf-8").splitlines():
            fam = json.loads(line).get("family", "")
            seen[fam] = seen.get(fam, 0) + 1
            if seen[fam] <= JUDGE_PER_FAMILY:
                keep.append(line + "\n")
        atomic.write_text(out, "".join(keep))
    return out
FROM_MINUTES = 30.0  # the default budget of `speedrun --from` (speedrun_from.py)
CHAT_PROMPTS = ["Who are you?", "What is 7 + 5?", "What is the capital of France?", "请写一首唐诗《静夜思》"]


def shard_documents(path: Path, bos_id: int, dtype: str):
    """Documents back out of a token shard: it is <|bos|> + tokens, document after document."""
    data = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    starts = np.flatnonzero(data == bos_id).tolist() + [len(data)]
    for a, b in zip(starts[:-1], starts[1:]):
        yield data[a + 1:b].tolist()


def compare_with_ngram(base: Path, corpus: Path, order: int = 3, seen_tokens: int | None = None) -> dict:
    """Val bits-per-byte of the base model next to Kneser-Ney n-grams over the same tokenizer: one
    counted on the whole training split, and one on as many training tokens as the neural model
    saw (the comparison at equal data)."""
    tok = Tokenizer.load(base)
    meta = json.loads((base / "data" / "meta.json").read_text())
    texts = [json.loads(line)["text"] for line in open(corpus / "val.jsonl", encoding="utf-8")]
    val_ids = [tok.encode(t) for t in texts]
    n_bytes = sum(len(t.encode()) for t in texts)
    neural = score_documents(load_model(base), tok, texts)
    res = {"neural_val_bpb": neural["bits_per_byte"], "val_tokens": sum(map(len, val_ids)), "val_bytes": n_bytes}

    def docs(limit=None):
        n = 0
        for d in shard_documents(base / "data" / "train.bin", tok.bos_id, meta["dtype"]):
            if limit is not None and n >= limit:
                return
            d = d if limit is None else d[:limit - n]
            n += len(d)
            yield d

    for name, limit in ((f"ngram{order}_val_bpb", None), (f"ngram{order}_same_tokens_val_bpb", seen_tokens)):
        if name.endswith("same_tokens_val_bpb") and not seen_tokens:
            continue
        ngram = NGramLM.train(docs(limit), order, tok.vocab_size, tok.bos_id)
        nats, _ = ngram.score_docs(val_ids)
        res[name] = nats / (math.log(2) * n_bytes)
    if seen_tokens:
        res["same_tokens"] = seen_tokens
    print(f"val bits-per-byte on all {len(texts)} val documents: neural {res['neural_val_bpb']:.3f}; "
          f"{order}-gram Kneser-Ney on the whole train split {res[f'ngram{order}_val_bpb']:.3f}"
          + (f", on the same {seen_tokens / 1e6:.2f}M tokens the neural model saw "
             f"{res[f'ngram{order}_same_tokens_val_bpb']:.3f}" if seen_tokens else ""), file=sys.stderr)
    return res


def judge(rm_dir: Path, sft_dir: Path, dpo_dir: Path, heldout: Path, n: int = 200, max_new_tokens: int = 48) -> dict:
    """`chatsmith eval DPO --tasks reward --reward-model RM --compare SFT` on the first n held-out
    prompts (the split is shuffled, so every family is in): greedy replies of both models scored by
    the reward model, DPO's win rate with ties counted half."""
    res = run_eval(dpo_dir, ["reward"], out=dpo_dir / "eval", limit=n, max_new_tokens=max_new_tokens,
                   heldout=str(heldout), reward_model=str(rm_dir), compare=str(sft_dir), quiet=True)
    r = res["tasks"]["reward"]
    out = {"prompts": r["n"], "dpo_win_rate_vs_sft": r["win_rate"], "win_rate_ci95": r["win_rate_ci95"],
           "wins": r["wins"], "ties": r["ties"], "losses": r["losses"], "dpo_mean_reward": r["mean_reward"],
           "sft_mean_reward": r["mean_reward_b"],
           "examples": [{"prompt": e["prompt"], "sft": e["reply_b"], "dpo": e["reply"]} for e in r["samples"]]}
    print(f"reward-model judge on {r['n']} held-out prompts: dpo preferred over sft on {r['win_rate']:.0%} "
          f"(± {r['win_rate_ci95']:.0%}; {r['wins']} wins, {r['ties']} ties, {r['losses']} losses)", file=sys.stderr)
    return out


def rl_config(algo: str, curriculum: bool) -> "rlhf.RLConfig":
    """The speedrun's RL stage: 8 prompts x 8 replies of up to 48 tokens per rollout on the task
    families, the prompts drawn at the edge of competence (--curriculum: groups that are neither all
    wrong nor all right). rft (expert iteration) is the default: it trains only on verified replies,
    so unlike GRPO on a model that is almost always wrong it cannot learn an answer prior ("0")."""
    common = dict(rollout_prompts=8, group_size=8, max_new_tokens=48, families=",".join(TASK_FAMILIES),
                  eval_prompts=HELDOUT_TASKS, curriculum=curriculum)
    if algo == "rft":
        return rlhf.RLConfig(algo="rft", ppo_epochs=1, minibatches=1, kl_coef=0.0, max_resample=2, **common)
    if algo == "grpo":
        return rlhf.RLConfig(algo="grpo", ppo_epochs=1, minibatches=2, kl_coef=0.02, **common)
    return rlhf.RLConfig(algo=algo, **common)  # a preset (grpo-simple) sets the rest


def check_flags(a):
    """What the flags alone decide, before any data is built or a directory made."""
    run_dir = Path(a.out)
    if run_dir.exists() and any(run_dir.iterdir()) and not a.resume:
        raise UserError(f"{run_dir} already exists: pass --resume to continue it, or choose another --out")
    pretrain.parse_mix(None if a.mix == "none" else a.mix)  # a bad --mix fails before any data is built
    least = (FIXED_S + PREP_S + MIN_TRAIN_S) / 60
    if a.minutes < least:
        raise UserError(f"--minutes {a.minutes:g} is too short: the fixed costs (data, tokenizer, evaluations, "
                        f"report) and {MIN_TRAIN_S} s of training need at least {least:.1f}")
    if a.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"--vocab-size {a.vocab_size} is too small: the 256 byte tokens and "
                        f"{len(SPECIAL_TOKENS)} special tokens alone need {256 + len(SPECIAL_TOKENS)}")
    if not (run_dir / "data" / "corpus" / "corpus_meta.json").exists() and not available_sources(a.sources_dir):
        raise UserError(f"no built-in sources under {a.sources_dir}: run `bash scripts/setup.sh` first")
    resolve_device(a.device)


def run(a) -> dict:
    if getattr(a, "from_model", None):  # the chain on a pretrained model: chatsmith/speedrun_from.py
        from chatsmith import speedrun_from

        a.minutes = FROM_MINUTES if a.minutes is None else a.minutes
        return speedrun_from.run(a)
    for flag in ("steps", "data"):
        if getattr(a, flag, None):
            raise UserError(f"--{flag} is for `speedrun --from MODEL` (the chain on a pretrained model)")
    a.minutes = 15.0 if a.minutes is None else a.minutes
    if a.preset is None:
        a.preset = preset_for(a.minutes, Path(a.out) if a.resume else None)
    t0 = time.time()
    check_flags(a)
    run_dir = Path(a.out)
    # a failure before training starts (the data, the tokenizer, the budget) removes an --out this
    # run created, so the corrected rerun is not refused
    with atomic.provisional_dir(run_dir):
        stages, corpus, chat, tok_dir, train_s = _prepare(a, run_dir, t0)
    return _train_and_report(a, run_dir, t0, stages, corpus, chat, tok_dir, train_s)


def _prepare(a, run_dir: Path, t0: float):
    budget = a.minutes * 60
    stages: dict[str, dict] = {}
    n_stages = N_STAGES
    corpus, chat = run_dir / "data" / "corpus", run_dir / "data" / "chat"
    banner(f"1/{n_stages} data")
    t = time.time()
    if not (corpus / "corpus_meta.json").exists():
        build_corpus(corpus, sources_dir=a.sources_dir)
    if not (chat / "dialogues_meta.json").exists():
        build_dialogues(chat, sources_dir=a.sources_dir, heldout_sizes={f: HELDOUT_TASKS for f in TASK_FAMILIES})
    if not (chat / "pairs_heldout.jsonl").exists():
        # held-out pairs from the family-capped file: the task families' 400 held-out prompts are
        # for RL's table, and 2.5x the pairs would only make the reward model's evaluation longer
        build_preferences(chat, heldout=judge_file(chat).name)
    dpo_heldout = chat / "pairs_heldout_dpo.jsonl"
    if not dpo_heldout.exists():
        lines = (chat / "pairs_heldout.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        atomic.write_text(dpo_heldout, "".join(lines[:DPO_EVAL_PAIRS]))
    meta = json.loads((corpus / "corpus_meta.json").read_text())
    stages["data"] = {"seconds": round(time.time() - t, 1), "corpus": meta,
                      "dialogues": json.loads((chat / "dialogues_meta.json").read_text())["families"]}

    banner(f"2/{n_stages} tokenizer")
    t = time.time()
    tok_dir = run_dir / "tokenizer"
    if not (tok_dir / "tokenizer_stats.json").exists():
        train_command([str(corpus / "train.jsonl")], a.vocab_size, str(tok_dir), val=[str(corpus / "val.jsonl")])
    stats = json.loads((tok_dir / "tokenizer_stats.json").read_text())
    print(f"tokenizer: {stats['vocab_size']} tokens, {stats.get('val_bytes_per_token')} bytes/token on val",
          file=sys.stderr)
    stages["tokenizer"] = {"seconds": round(time.time() - t, 1), **stats}

    train_s = budget - (time.time() - t0) - FIXED_S
    if train_s < MIN_TRAIN_S:
        raise UserError(f"--minutes {a.minutes:g} leaves {train_s:.0f}s for training; give at least "
                        f"{(budget - train_s + MIN_TRAIN_S) / 60:.1f} minutes")
    return stages, corpus, chat, tok_dir, train_s


def _train_and_report(a, run_dir: Path, t0: float, stages: dict, corpus: Path, chat: Path, tok_dir: Path,
                      train_s: float) -> dict:
    n_stages = N_STAGES

    shares = shares_for(a.minutes)

    def minutes_for(stage: str, spent_before: float) -> float:
        return stage_minutes(shares, stage, spent_before, train_s)

    spent = 0.0  # training seconds so far
    common = dict(device=a.device, dtype=a.dtype, log_every=10, seed=a.seed)
    mix = None if a.mix == "none" else a.mix
    judge_heldout = judge_file(chat)  # written by _prepare

    def resume(d: Path) -> bool:
        return a.resume and (d / "checkpoints").exists()

    banner(f"3/{n_stages} pretrain")
    base = run_dir / "base"
    # the budget covers tokenising the corpus and the task text into shards too (SHARD_S)
    cfg = train_config(pretrain.DEFAULTS, out=str(base), preset=a.preset,
                       max_minutes=minutes_for("pretrain", spent) - SHARD_S / 60, resume=resume(base),
                       **SPEEDRUN["pretrain"], **common)
    t = time.time()
    # mid-training: task text mixed into the corpus, the dialogues' held-out problems left out of it
    summary = pretrain.run(cfg, inputs=[str(corpus)], tokenizer=str(tok_dir), mix=mix,
                           mix_exclude=str(chat) if mix else None)
    # the stage's wall time (tokenising the corpus into shards included), not the trainer's own "seconds"
    stages["pretrain"] = {**summary, "seconds": round(time.time() - t, 1)}
    spent += time.time() - t

    # the classical baseline on the same tokens, and both scored on the whole val split
    t = time.time()
    stages["baseline"] = compare_with_ngram(base, corpus, order=3, seen_tokens=summary["tokens"])
    stages["baseline"]["seconds"] = round(time.time() - t, 1)
    spent += stages["baseline"]["seconds"] - BASELINE_S  # its unused reserve goes to the stages after it

    banner(f"4/{n_stages} sft")
    sft_dir = run_dir / "sft"
    cfg = train_config(sft.DEFAULTS, out=str(sft_dir), max_minutes=minutes_for("sft", spent),
                       resume=resume(sft_dir), **SPEEDRUN["sft"], **common)
    t = time.time()
    sft_summary = sft.run(cfg, [str(chat / "train.jsonl")], str(base), heldout=[str(judge_heldout)],
                          eval_samples=16, eval_max_new_tokens=40)
    # the stage's wall time (held-out evaluations included), not the trainer's own "seconds"
    stages["sft"] = {**sft_summary, "seconds": round(time.time() - t, 1)}
    spent += stages["sft"]["seconds"] - SFT_EVAL_S

    banner(f"5/{n_stages} reward model")
    rm_dir = run_dir / "reward"
    cfg = train_config(reward.DEFAULTS, out=str(rm_dir), max_minutes=minutes_for("reward", spent),
                       resume=resume(rm_dir), **SPEEDRUN["reward"], **common)
    t = time.time()
    stages["reward"] = reward.run(cfg, [str(chat / "pairs_train.jsonl")], str(sft_dir),
                                  heldout=[str(chat / "pairs_heldout.jsonl")], skip_bad=True)
    stages["reward"]["seconds"] = round(time.time() - t, 1)
    spent += stages["reward"]["seconds"] - REWARD_EVAL_S

    banner(f"6/{n_stages} reinforcement learning ({a.rl_algo}, verifiable reward) and its same-compute SFT control")
    rl_dir = run_dir / "rl"
    rl_cfg = rl_config(a.rl_algo, a.curriculum)
    cfg = train_config(rlhf.DEFAULTS, out=str(rl_dir), max_minutes=minutes_for("rl", spent),
                       resume=resume(rl_dir), **SPEEDRUN["rl"], **{**common, "log_every": 2})
    t = time.time()
    # the control: SFT from the same checkpoint for RL's optimizer work (rl_control.py), evaluated
    # on the same held-out prompts, so the report shows start vs RL vs more SFT
    stages["rl"] = rlhf.run(cfg, rl_cfg, [str(chat / "train.jsonl")], str(sft_dir), ["exact"],
                            heldout=[str(chat / "heldout.jsonl")], control="tokens")
    stages["rl"]["seconds"] = round(time.time() - t, 1)
    spent += stages["rl"]["seconds"] - RL_EVAL_S

    banner(f"7/{n_stages} direct preference optimization")
    dpo_dir = run_dir / "dpo"
    t = time.time()
    # on-policy pairs: the best and the worst of 4 SFT replies by the reward model, and DPO with the
    # chosen reply's NLL added (RPO). Measured on one SFT model, judged on 200 held-out prompts:
    # off-policy built-in pairs 45%; best/worst of 2 47%, with RPO 48%; best/worst of 4 27% (plain DPO
    # pushed both replies down and drifted off what the model can say), with RPO 58%
    pairs = chat / "pairs_onpolicy.jsonl"
    if not pairs.exists():
        info = dpo.sample_pairs(str(sft_dir), str(rm_dir), [str(chat / "train.jsonl")], pairs,
                                limit=DPO_PAIR_PROMPTS, samples=4)
        print(f"on-policy pairs: {info['pairs']} from {info['prompts']} prompts", file=sys.stderr)
    pair_s = time.time() - t
    stages["dpo pairs"] = {"seconds": round(pair_s, 1)}  # its own row of the time table: it is not DPO training
    cfg = train_config(dpo.DEFAULTS, out=str(dpo_dir), max_minutes=max(minutes_for("dpo", spent) - pair_s / 60, 0.33),
                       resume=resume(dpo_dir), **SPEEDRUN["dpo"], **common)
    t = time.time()
    # DPO_EVAL_PAIRS of the held-out pairs (written by _prepare)
    stages["dpo"] = dpo.run(cfg, [str(pairs)], str(sft_dir), heldout=[str(chat / "pairs_heldout_dpo.jsonl")],
                            beta=0.1, skip_bad=True, rpo_alpha=1.0)
    stages["dpo"]["seconds"] = round(time.time() - t, 1)

    banner(f"8/{n_stages} judge: DPO vs SFT by the reward model")
    t = time.time()
    stages["judge"] = judge(rm_dir, sft_dir, dpo_dir, judge_heldout)
    stages["judge"]["seconds"] = round(time.time() - t, 1)

    banner(f"9/{n_stages} samples and report")
    t = time.time()
    engine = Engine(load_model(base), Tokenizer.load(base))
    samples = []
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        c = engine.generate(engine.tok.encode(prompt, bos=True),
                            SamplingParams(max_new_tokens=60, temperature=0.8, top_p=0.95, seed=i))[0]
        samples.append({"prompt": prompt, "completion": c.text})
        print(f"\n> {prompt}{c.text}")
    conversation = {}
    print()
    for name, d in (("sft", sft_dir), ("rl", rl_dir), ("dpo", dpo_dir)):
        chat_engine = Engine(load_model(d), Tokenizer.load(d))
        conversation[name] = []
        for q in CHAT_PROMPTS:
            ids, _ = chat_engine.tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True)
            c = chat_engine.generate(ids, SamplingParams(max_new_tokens=80, temperature=0))[0]
            conversation[name].append({"user": q, "assistant": c.text})
            print(f"[{name}] you> {q}\n[{name}] bot> {c.text}")
    atomic.write_text(run_dir / "samples.txt", 
        "".join(f"> {s['prompt']}{s['completion']}\n\n" for s in samples)
        + "".join(f"[{name}] you> {c['user']}\n[{name}] bot> {c['assistant']}\n"
                  for name, conv in conversation.items() for c in conv))

    base_text = "".join(s["completion"] for s in samples)
    stages["samples"] = {"seconds": round(time.time() - t, 1),
                         # how often the byte-level base model emitted bytes that are not UTF-8
                         "invalid_utf8_sequences": invalid_utf8(base_text), "sample_characters": len(base_text)}
    result = {"minutes_budget": a.minutes, "seconds": round(time.time() - t0, 1), "shares": shares,
              "seed": a.seed, "mix": mix, "rl_algo": a.rl_algo, "curriculum": a.curriculum, "stages": stages,
              "val_bpb": stages["baseline"]["neural_val_bpb"], "baseline": stages["baseline"],
              "sft_eval": sft_summary.get("eval"), "rl_eval": stages["rl"].get("eval"),
              "reward_eval": stages["reward"].get("eval"), "judge": stages["judge"], "samples": samples,
              "conversation": conversation}
    atomic.write_json(run_dir / "speedrun.json", result)
    b = stages["baseline"]
    print(f"\nspeedrun finished in {result['seconds'] / 60:.1f} min", file=sys.stderr)
    print(f"base model: val bits-per-byte {b['neural_val_bpb']:.3f} after {summary['steps']} steps "
          f"({summary['tokens'] / 1e6:.2f}M tokens); 3-gram Kneser-Ney on the same tokens "
          f"{b.get('ngram3_same_tokens_val_bpb', float('nan')):.3f}, on the whole train split {b['ngram3_val_bpb']:.3f}")
    ev = sft_summary.get("eval") or {}
    if ev.get("sft"):
        em = ", ".join(f"{k} {v:.0%}" for k, v in ev["sft"]["exact_match"].items())
        print(f"chat model, held-out: assistant loss {ev['base']['assistant_loss']:.2f} -> "
              f"{ev['sft']['assistant_loss']:.2f}, replies ended {ev['sft']['ended_share']:.0%}, exact match: {em}")
    rev = stages["reward"].get("eval") or {}
    if rev:
        print(f"reward model: held-out pairwise accuracy {rev['reward']['heldout_accuracy']:.1%}")
    rl_ev = stages["rl"].get("eval") or {}
    if rl_ev.get("rl"):
        ctl = (rl_ev.get("control") or {}).get("exact_match", {})
        print(f"RL ({a.rl_algo}, exact-match reward), held-out exact match, start -> RL (same-compute SFT control): "
              + ", ".join(f"{f} {rl_ev['init']['exact_match'][f]:.1%} -> {v:.1%}"
                          + (f" ({ctl[f]:.1%})" if f in ctl else "") for f, v in rl_ev["rl"]["exact_match"].items())
            + f"; KL to the SFT model {rl_ev['rl']['kl_to_ref']:.2f} nats/reply")
        for key, label in RL_COMPARISONS:
            if rl_ev.get(key):
                print(f"  {label} (paired, 95%): " + "; ".join(f"{f} {diff_cell(d)}" for f, d in rl_ev[key].items()))
        if "top_answer" in rl_ev["rl"]:  # a gain made by repeating one answer is not arithmetic
            print(f"  most common final answer: {rl_ev['init'].get('top_answer')} on "
                  f"{rl_ev['init'].get('top_answer_share', 0):.0%} of SFT replies, {rl_ev['rl']['top_answer']} "
                  f"on {rl_ev['rl']['top_answer_share']:.0%} after RL")
    j = stages["judge"]
    print(f"DPO vs SFT, judged by the reward model: DPO preferred on {j['dpo_win_rate_vs_sft']:.0%} of "
          f"{j['prompts']} held-out prompts")
    for name, d in (("base model", base), ("chat model", sft_dir), ("RL model", rl_dir), ("DPO model", dpo_dir)):
        print(f"{name}: {d}")
    j = stages["judge"]
    best = dpo_dir if (j.get("dpo_win_rate_vs_sft") or 0) > 0.5 else sft_dir  # the judge's pick, one answer
    print(f"chat with it: {invocation()} chat {best}")
    print(f"report card: {write_report(run_dir)}")
    return result


def add_arguments(p):
    p.add_argument("--minutes", type=float, default=None, help="total time budget in minutes (default 15; "
                   f"with --from {FROM_MINUTES:g})")
    p.add_argument("--out", default="runs/speedrun", help="run directory (every stage in a folder of its own)")
    p.add_argument("--preset", default=None, choices=registry.presets(),
                   help=f"size of the base model (default {PRESET} below --minutes {LONG_MINUTES}, {PRESET_LONG} from it)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokens in the trained tokenizer")
    p.add_argument("--sources-dir", default=default_sources_dir(),
                   help="raw sources fetched by scripts/setup.sh ($CHATSMITH_SOURCES overrides)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="where to train (auto: cuda, else mps, else cpu)")
    p.add_argument("--dtype", default="auto", choices=TRAIN_CHOICES["dtype"],
                   help="auto: bf16 autocast on a GPU that supports it, else fp32 (with --from: also bf16 on a "
                        "CPU with native bf16, AMX or AVX-512 BF16)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted speedrun")
    p.add_argument("--seed", type=int, default=0, help="seed of every training stage (the data builds keep their own)")
    p.add_argument("--mix", default=MIX, metavar="corpus=W,tasks=W",
                   help="pretraining's mixture of corpus and task text (pretrain --mix; the dialogues' held-out "
                        "problems are left out of the task text), or none for the corpus alone")
    p.add_argument("--rl-algo", default="rft", choices=RL_ALGOS, help="the RL stage's recipe (rlhf --algo)")
    p.add_argument("--curriculum", action=argparse.BooleanOptionalAction, default=True,
                   help="RL draws prompts at the edge of competence (rlhf --curriculum)")
    g = p.add_argument_group("the chain on a pretrained model (--from)")
    g.add_argument("--from", dest="from_model", metavar="MODEL", default=None,
                   help="start from a pretrained causal LM instead of training one: a name (smollm2), a Hugging "
                        "Face directory or a GGUF file, as `chatsmith import` takes; LoRA SFT -> reward model -> "
                        "GRPO -> DPO, each stage evaluated")
    g.add_argument("--name", default="Smith", help="with --from: the assistant's name in the identity dialogues")
    g.add_argument("--data", nargs="+", metavar="FILE", help="with --from: your own dialogues for SFT, read as "
                   "`sft --data` reads them (FILE:WEIGHT too)")
    g.add_argument("--steps", metavar="SPEC", help="with --from: fixed work instead of --minutes, e.g. "
                   "sft=40,reward=30,rl=10,dpo=20 (optimizer steps per stage)")
    g.add_argument("--eval-items", type=int, default=20, help="with --from: held-out items per task family (and "
                   "facts per fact family) in every stage's evaluation")
    g.add_argument("--eval-quantize", default="auto", choices=["auto", "none", "int8", "bf16"],
                   help="with --from: decode weights of the evaluations' generations, RL's rollouts and DPO's "
                   "pair sampling (auto: bf16 on a CPU with native bf16 when --dtype is bf16, else none = fp32)")


VERB = Verb("speedrun", "the whole chain on the built-in corpus (or --from a pretrained model) under a time budget", add_arguments, run)
