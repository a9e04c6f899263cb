"""`chatsmith eval MODEL_DIR --tasks NAME...`: run the tasks, write ``metrics.json``, print a table.

Task names are resolved by :mod:`chatsmith.eval.taskset` (task files: :mod:`chatsmith.eval.taskfile`),
prompts rendered by :mod:`chatsmith.eval.prompting`, each kind of task run by
:mod:`chatsmith.eval.kinds` and scored by :mod:`chatsmith.eval.scoring`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from chatsmith.atomic import write_json
from chatsmith.checkpoint import load_model
from chatsmith.config import DEVICES
from chatsmith.engine import Engine
from chatsmith.errors import UserError
from chatsmith.eval.clip import run_clip_eval
from chatsmith.flags import Verb
from chatsmith.eval.kinds import RunContext, run_task
from chatsmith.eval.prompting import MODES, Template, load_template, model_has_chat_template
from chatsmith.eval.taskset import Task, resolve_tasks
from chatsmith.eval.translation import is_translation_task, run_translation_eval
from chatsmith.runtime import resolve_device
from chatsmith.reward_model import load_reward_model
from chatsmith.tokenizer import Tokenizer
from chatsmith.tools.inline import builtin_tools


def _check_options(mode: str, k, limit, max_new_tokens: int, samples: int = 1, temperature: float = 1.0):
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UserError(f"--samples must be a positive integer, got {samples!r}")
    if not temperature > 0:
        raise UserError(f"--temperature must be above 0 (the greedy answer is always measured), got {temperature!r}")
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"--k must be a positive integer, got {k!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"--limit must be a positive integer, got {limit!r}")
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")


def _templates(mode: str, templates_dir) -> tuple[Template, Template]:
    """The mode's template, and the one multiple-choice items are scored on."""
    template = load_template(mode, templates_dir)
    if mode == "k-shot" and not template.uses_examples:
        raise UserError(f"{template.path}: a k-shot template needs an {{examples}} placeholder")
    return template, load_template("zero-shot", templates_dir) if mode == "cot" else template


def _load_judges(tasks: list[Task], reward_model, compare, device: str) -> tuple[object, Engine | None]:
    """The reward model (a directory or a scorer object) and model B's engine, loaded before
    anything is generated so that bad paths fail fast; (None, None) without reward tasks."""
    has_reward = any(t.kind == "reward" for t in tasks)
    if has_reward and reward_model is None:
        raise UserError("reward tasks need a reward model: pass --reward-model DIR (a model trained with "
                        "`chatsmith reward`)")
    if compare is not None and not has_reward:
        raise UserError("--compare MODEL_B gives a win rate judged by the reward model: add a reward task "
                        "(--tasks reward, or reward:PROMPTS.jsonl) and --reward-model DIR")
    if not has_reward:
        return None, None
    scorer = reward_model
    if isinstance(reward_model, (str, os.PathLike)):
        scorer = load_reward_model(reward_model, device=resolve_device(device))
    engine_b = None
    if compare is not None:
        engine_b = Engine(load_model(compare, device=resolve_device(device)), Tokenizer.load(compare))
    return scorer, engine_b


def _metrics(model_dir, run: RunContext, results: dict, reward_model, compare, t0: float) -> dict:
    return {
        "model": str(model_dir),
        "mode": run.mode,
        "template": {"path": run.template.path, "text": run.template.text},
        "k": run.k if run.template.uses_examples else 0,  # examples per prompt (0: none)
        "seed": run.seed,
        "chat": run.chat,
        "limit": run.limit,
        "max_new_tokens": run.max_new_tokens,
        "decoding": "greedy" if run.samples == 1 else f"greedy, and {run.samples} samples at temperature "
                                                      f"{run.temperature:g} per exact-match item",
        "tasks": results,
        **({"reward_model": str(reward_model)} if isinstance(reward_model, (str, os.PathLike)) else {}),
        **({"compare": str(compare)} if compare is not None else {}),
        "seconds": round(time.time() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def format_table(metrics: dict) -> str:
    rows = [("task", "kind", "n", "metrics")]
    for name, r in metrics["tasks"].items():
        kind = r["kind"]
        if kind == "lm":
            m = f"loss {r['loss']:.4f}  ppl {r['perplexity']:.2f}  bpb {r['bits_per_byte']:.4f}"
        elif kind == "exact_match":
            m = f"accuracy {r['accuracy']:.3f} ({r['correct']}/{r['n']})"
            if "sampled" in r:
                sm = r["sampled"]
                n = sm["samples"]
                m += (f"  sampled x{n} at T={sm['temperature']:g}: pass@1 {sm['pass_at']['1']:.3f}  "
                      f"pass@{n} {sm['pass_at'].get(str(n), float('nan')):.3f}  maj@{n} {sm[f'maj_at_{n}']:.3f}  "
                      f"edge {sm['edge_share']:.2f}")
        elif kind == "reference":
            m = f"BLEU {r['bleu']:.2f}  chrF {r['chrf']:.2f}"
        elif kind == "reward":
            m = f"reward {r['mean_reward']:.3f} ± {r['reward_std']:.3f}"
            if "win_rate" in r:
                m += (f"  vs {Path(r['compare']).name} {r['mean_reward_b']:.3f}: win rate {r['win_rate']:.1%} "
                      f"± {r['win_rate_ci95']:.1%} ({r['wins']}-{r['ties']}-{r['losses']})")
        else:
            m = f"acc {r['accuracy']:.3f}  acc_norm {r['accuracy_norm']:.3f}"
        rows.append((name, kind, str(r["n"]), m))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {d}" for a, b, c, d in rows]
    lines.insert(1, "-" * max(len(x) for x in lines))
    head = (f"mode {metrics['mode']}" + (f", k={metrics['k']}" if metrics["k"] else "")
            + f", {'chat' if metrics['chat'] else 'plain'} prompts, seed {metrics['seed']}"
            + ("; reward tasks: chat-template prompts, greedy replies" if any(
                r["kind"] == "reward" for r in metrics["tasks"].values()) else ""))
    return head + "\n" + "\n".join(lines)


def run_eval(model_dir: str | os.PathLike, tasks: list[str], out: str | os.PathLike | None = None,
             mode: str = "zero-shot", k: int = 3, limit: int | None = None, max_new_tokens: int = 64,
             seed: int = 0, templates_dir: str | os.PathLike | None = None, pool: str | None = None,
             heldout: str | None = None, chat: bool | None = None, device: str = "cpu",
             n_samples: int = 3, quiet: bool = False, model=None, tok=None, reward_model=None,
             compare: str | os.PathLike | None = None, tools: list[str] | None = None, num_beams: int = 1,
             samples: int = 1, temperature: float = 1.0) -> dict:
    """Evaluate a model on ``tasks`` and write ``metrics.json`` into ``out`` (default
    ``MODEL_DIR/eval``); returns the metrics and prints a table unless ``quiet``.

    ``chat``: None decides from the checkpoint (chat template present and not a pretraining-stage
    model), False forces plain prompts (--no-chat), True the chat template. ``model``/``tok``
    may be passed already loaded (tests); otherwise they are loaded from ``model_dir``.
    ``reward_model``: a directory with a reward head (or an object with ``.score(conversations)``),
    needed by reward tasks; ``compare``: a second model directory whose replies the reward tasks
    score too, giving the win rate of ``model_dir`` against it. ``tools``: built-in tools (calculator)
    offered in chat prompts and run inside generation; answers are scored on the text around the calls.
    ``samples`` > 1: exact-match tasks also draw that many answers per item at ``temperature`` and
    report pass@k, maj@N and the share of items right in some samples but not all.
    """
    t0 = time.time()
    tasks = [str(t) for t in ([tasks] if isinstance(tasks, (str, os.PathLike)) else tasks)]
    _check_options(mode, k, limit, max_new_tokens, samples, temperature)
    if any(is_translation_task(t) for t in tasks):  # its own runner: encoder-decoder models, BLEU per direction
        if not all(is_translation_task(t) for t in tasks):
            raise UserError("translation tasks run on their own: evaluate other tasks in a separate `chatsmith eval`")
        return run_translation_eval(model_dir, tasks, out, limit, device, max_new_tokens, num_beams, n_samples, quiet)
    template, mc_template = _templates(mode, templates_dir)
    task_list = resolve_tasks(tasks, heldout, pool, template.uses_examples or mc_template.uses_examples, limit)
    scorer, engine_b = _load_judges(task_list, reward_model, compare, device)
    if model is None:
        model = load_model(model_dir, device=resolve_device(device))
    if tok is None:
        tok = Tokenizer.load(model_dir)
    use_chat = model_has_chat_template(model_dir) if chat is None else bool(chat)
    try:
        builtin = builtin_tools(tools)
    except ValueError as e:
        raise UserError(f"--tools: {e}") from None
    if builtin and not (use_chat and tok.tool_markers is not None):
        raise UserError("--tools needs a chat model whose template knows tools (chatsmith's, or ChatML)")
    run = RunContext(model, tok, use_chat, mode, k, seed, limit, max_new_tokens, n_samples, template, mc_template,
                     scorer, engine_b, None if compare is None else str(compare), builtin or None, samples,
                     temperature)
    results = {task.name: run_task(task, run, quiet) for task in task_list}
    metrics = _metrics(model_dir, run, results, reward_model, compare, t0)
    path = (Path(out) if out is not None else Path(model_dir) / "eval") / "metrics.json"
    write_json(path, metrics)
    metrics["path"] = str(path)
    if not quiet:
        print(format_table(metrics))
        print(f"metrics written to {path}")
    return metrics


# --- the verb -------------------------------------------------------------------------------------

def add_arguments(p):
    p.add_argument("model", help="model directory")
    p.add_argument("--tasks", nargs="+", required=True, metavar="NAME",
                   help="lm:PATH, arithmetic, word_problem, quiz, reward, reward:PROMPTS.jsonl, PATH.jsonl task files, "
                   "translation[:PAIRS.jsonl] (BLEU/chrF per direction and source; default data/translation/test.jsonl); "
                   "for a clip model: clip (zero-shot + retrieval on the built-in image sets) or clip:DIR")
    p.add_argument("--mode", choices=list(MODES), default="zero-shot", help="prompting strategy")
    p.add_argument("--k", type=int, default=3, help="examples per prompt in k-shot mode")
    p.add_argument("--limit", type=int, default=None, help="first N items (documents for lm:) per task")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest generated answer (tokens)")
    p.add_argument("--seed", type=int, default=0, help="seeds the k-shot example draws")
    p.add_argument("--out", default=None, help="folder for metrics.json (default: MODEL/eval)")
    p.add_argument("--pool", default=None, help="example pool for k-shot on task files (default: NAME.pool.jsonl)")
    p.add_argument("--heldout", default=None, help="held-out dialogues for the built-in tasks (default: "
                   "data/chat/heldout.jsonl; k-shot draws from train.jsonl beside it)")
    p.add_argument("--templates", default=None, help="folder of edited prompt templates (copy chatsmith/eval/prompts)")
    p.add_argument("--reward-model", default=None, metavar="DIR",
                   help="reward model (`chatsmith reward` output) that scores the replies of reward tasks")
    p.add_argument("--compare", default=None, metavar="MODEL_B",
                   help="with a reward task: also generate MODEL_B's replies and report MODEL's win rate against it")
    grp = p.add_mutually_exclusive_group()
    grp.add_argument("--no-chat", dest="chat", action="store_false", default=None,
                     help="plain 'Question: ... Answer:' prompts even for a chat model")
    grp.add_argument("--chat", dest="chat", action="store_true", help="force the chat template")
    p.add_argument("--tools", nargs="+", default=None, metavar="TOOL",
                   help="offer built-in tools (calculator) in chat prompts and run the model's calls")
    p.add_argument("--samples", type=int, default=1, metavar="N",
                   help="exact-match tasks: also N sampled answers per item: pass@k, maj@N, and the share of items "
                        "right in some samples but not all (how much RL could sharpen)")
    p.add_argument("--temperature", type=float, default=1.0, help="the temperature of --samples")
    p.add_argument("--device", default="auto", choices=DEVICES, help="where to run (auto: cuda, else mps, else cpu)")
    p.add_argument("--images-root", default="data/images", help="clip tasks: where `data build --what images` wrote")
    p.add_argument("--num-beams", type=int, default=1, help="translation tasks with an encoder-decoder model: beam width")


def main(a):
    if any(t == "clip" or t.startswith("clip:") for t in a.tasks):  # the image-text family's own metrics
        run_clip_eval(a.model, a.tasks, out=a.out, limit=a.limit, device=resolve_device(a.device),
                      images_root=a.images_root)
        return
    run_eval(a.model, a.tasks, out=a.out, mode=a.mode, k=a.k, limit=a.limit, max_new_tokens=a.max_new_tokens,
             seed=a.seed, templates_dir=a.templates, pool=a.pool, heldout=a.heldout, chat=a.chat, device=a.device,
             reward_model=a.reward_model, compare=a.compare, tools=a.tools, num_beams=a.num_beams,
             samples=a.samples, temperature=a.temperature)


VERB = Verb("eval", "evaluate a model on tasks: LM metrics, exact match, BLEU/chrF, multiple choice",
            add_arguments, main)
