"""How each kind of `chatsmith eval` task is run, given the model and the run's settings.

- lm: whole-document loss, perplexity and bits-per-byte (:func:`chatsmith.eval.lm.score_documents`);
- exact match and reference: greedy generation from the mode's prompt, scored by
  :mod:`chatsmith.eval.scoring`;
- choice: log-likelihood of each choice after the prompt, nothing generated;
- reward: greedy chat-template replies scored by a reward model, optionally against a second model.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

from chatsmith.batching import continuation_logprobs
from chatsmith.data.corpus import iter_input_documents
from chatsmith.engine import Engine, SamplingParams
from chatsmith.errors import UserError
from chatsmith.eval.lm import score_documents
from chatsmith.eval.prompting import Prompter, Template, examples_for
from chatsmith.eval.scoring import (exact_match, extract_cot_answer, mean_std, pick_choices, reward_summary,
                                    sampled_scores, score_references, win_rate)
from chatsmith.eval.taskfile import Item
from chatsmith.eval.taskset import Task
from chatsmith.tokenizer import Tokenizer
from chatsmith.tools.calls import split_reply
from chatsmith.tools.inline import ToolRunner


@dataclass
class RunContext:
    """What the tasks of one run share: the model, the prompting settings, the judge."""
    model: object
    tok: Tokenizer
    chat: bool
    mode: str
    k: int
    seed: int
    limit: int | None
    max_new_tokens: int
    n_samples: int
    template: Template
    mc_template: Template             # multiple choice: cot scores it on the zero-shot template
    scorer: object = None             # .score(conversations), for reward tasks
    engine_b: Engine | None = None    # the model compared against (--compare)
    compare: str | None = None
    tools: dict | None = None         # built-in tools the model may call (eval --tools), chat prompts only
    samples: int = 1                  # exact-match tasks: also this many sampled answers per item (>1)
    temperature: float = 1.0          # ... at this temperature
    _engine: Engine | None = field(default=None, init=False, repr=False)

    @property
    def engine(self) -> Engine:
        if self._engine is None:  # only when something is generated
            self._engine = Engine(self.model, self.tok)
        return self._engine


def _generate(engine: Engine, prompts: list[list[int] | None], params: SamplingParams) -> list[str | None]:
    """Replies to the prompts in one batch; None where the prompt is None (no room in the context)."""
    todo = [i for i, p in enumerate(prompts) if p is not None]
    outs = engine.generate_many([prompts[i] for i in todo], params) if todo else []
    replies: list[str | None] = [None] * len(prompts)
    for i, c in zip(todo, outs):
        replies[i] = c.text
    return replies


def _fit_prompts(prompter: Prompter, items: list[Item], shots: list[list[Item]], room: int):
    """(ids or None where over-long, texts, examples kept per item, items with fewer examples)."""
    prompts, texts, kept, fewer = [], [], [], 0
    for it, ex in zip(items, shots):
        ids, text, n = prompter.fit(it, ex, room)
        fewer += n < len(ex)
        kept.append(n)
        texts.append(text)
        prompts.append(None if len(ids) >= prompter.ctx else ids)
    return prompts, texts, kept, fewer


def _run_generation(task: Task, run: RunContext) -> dict:
    engine = run.engine
    cot = run.mode == "cot"
    tools = run.tools if run.chat else None
    prompter = Prompter(run.tok, run.template, run.chat, run.model.cfg.max_seq_len, worked_examples=cot,
                        tools=[spec for spec, _ in tools.values()] if tools else None)
    stop = [] if prompter.chat else (["\n\n"] if cot else ["\n"])
    shots = examples_for(task, run.template, run.k, run.seed)
    prompts, texts, kept, fewer = _fit_prompts(prompter, task.items, shots, run.max_new_tokens)
    params = SamplingParams(max_new_tokens=run.max_new_tokens, temperature=0, stop=stop, seed=run.seed,
                            tool_hook=ToolRunner(run.tok, tools).fork if tools else None)
    replies = [r if r is not None else "" for r in _generate(engine, prompts, params)]
    steps: list[list] = [[] for _ in replies]
    if tools:  # score what the model said around its calls; count the calls it made
        split = [split_reply(r, run.tok.tool_markers) for r in replies]
        replies, steps = [c for c, *_ in split], [s + [(n, a, "") for n, a in calls] for _, s, calls, _ in split]
    extracted = [extract_cot_answer(r) if cot else r.strip() for r in replies]
    res = {"n": len(task.items)}
    if task.kind == "exact_match":
        ok, scores = exact_match(task.items, extracted)
        res.update(scores)
        if run.samples > 1:  # N samples per item besides the greedy answer: pass@k, maj@N, edge share
            res["sampled"] = _sampled(run, prompts, params, task, cot)
    else:
        ok = None
        res.update(score_references(extracted, [it.references for it in task.items]))
    res.update(too_long=prompts.count(None), stop=stop)
    if tools:
        res.update(tools=sorted(tools), tool_calls=sum(map(len, steps)), items_with_calls=sum(1 for s in steps if s))
    if run.template.uses_examples:
        res.update(shots_mean=sum(kept) / len(kept), fewer_shots=fewer)
    samples = []
    for i, it in enumerate(task.items[:run.n_samples]):
        s = {"loc": it.loc, "prompt": texts[i], "reply": replies[i], "extracted": extracted[i]}
        if tools:
            s["tool_calls"] = [{"name": n, "arguments": a, "result": r} for n, a, r in steps[i]]
        if ok is not None:
            s.update(answers=it.answers, correct=bool(ok[i]))
        else:
            s["references"] = it.references
        samples.append(s)
    res["samples"] = samples
    return res


def _sampled(run: RunContext, prompts: list[list[int] | None], greedy: SamplingParams, task: Task, cot: bool) -> dict:
    """--samples N: N replies per prompt at --temperature (a prompt's N share one prefill), scored by
    scoring.sampled_scores; an over-long prompt's samples are empty (wrong), as its greedy reply is."""
    todo = [i for i, p in enumerate(prompts) if p is not None]
    params = dataclasses.replace(greedy, temperature=run.temperature, top_p=1.0)
    outs = run.engine.generate_many([prompts[i] for i in todo], params, n=run.samples) if todo else []
    texts = [[""] * run.samples for _ in prompts]
    for j, i in enumerate(todo):
        texts[i] = [c.text for c in outs[j * run.samples:(j + 1) * run.samples]]
    if run.tools:
        texts = [[split_reply(t, run.tok.tool_markers)[0] for t in ts] for ts in texts]
    answers = [[extract_cot_answer(t) if cot else t.strip() for t in ts] for ts in texts]
    return sampled_scores(task.items, answers, run.temperature)[1]


def _run_choice(task: Task, run: RunContext) -> dict:
    tok = run.tok
    prompter = Prompter(tok, run.mc_template, run.chat, run.model.cfg.max_seq_len, worked_examples=False)
    shots = examples_for(task, run.mc_template, run.k, run.seed)
    pairs, spans, texts, fewer = [], [], [], 0
    for it, ex in zip(task.items, shots):
        conts = [tok.encode(ch if prompter.chat else " " + ch) for ch in it.choices]
        ids, text, n = prompter.fit(it, ex, max(len(c) for c in conts) - 1)
        fewer += n < len(ex)
        texts.append(text)
        spans.append((len(pairs), len(pairs) + len(conts)))
        pairs += [(ids, c) for c in conts]
    lps, truncated = continuation_logprobs(run.model, pairs, tok.pad_id)
    per_item = [lps[a:b] for a, b in spans]
    picked = pick_choices(task.items, per_item)
    res = {"n": len(task.items), "accuracy": picked["accuracy"], "accuracy_norm": picked["accuracy_norm"],
           "correct": picked["correct"], "correct_norm": picked["correct_norm"], "truncated": truncated}
    if run.mc_template.uses_examples:
        res["fewer_shots"] = fewer
    res["samples"] = [{"loc": it.loc, "prompt": texts[i], "choices": it.choices, "label": it.label,
                       "logprobs": per_item[i], "picked": picked["picks"][i][0],
                       "picked_norm": picked["picks"][i][1]}
                      for i, it in enumerate(task.items[:run.n_samples])]
    return res


def _chat_replies(engine: Engine, items: list[Item], max_new_tokens: int, seed: int) -> list[str | None]:
    """Greedy chat-template replies; None where the prompt leaves no room in the context."""
    ctx = engine.model.cfg.max_seq_len
    prompts = [engine.tok.render_chat(it.messages, add_generation_prompt=True)[0] for it in items]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, seed=seed)
    return _generate(engine, [p if len(p) < ctx else None for p in prompts], params)


def _run_reward(task: Task, run: RunContext) -> dict:
    """Mean reward-model score of the model's replies; with a second model, both models' replies to
    the same prompts are scored and A's win rate is reported. Replies are greedy, through the chat
    template (a reward model scores chat conversations)."""
    items = task.items
    replies = _chat_replies(run.engine, items, run.max_new_tokens, run.seed)
    replies_b = (_chat_replies(run.engine_b, items, run.max_new_tokens, run.seed)
                 if run.engine_b is not None else None)
    keep = [i for i in range(len(items)) if replies[i] is not None and (replies_b is None or replies_b[i] is not None)]
    if not keep:
        raise UserError(f"task {task.name}: no prompt fits the model's context with room to reply")
    conv = lambda i, r: items[i].messages + [{"role": "assistant", "content": r[i]}]  # noqa: E731
    scores = run.scorer.score([conv(i, replies) for i in keep])
    res = {"n": len(keep), "too_long": len(items) - len(keep),
           **reward_summary([items[i].family for i in keep], scores)}
    scores_b = None
    if replies_b is not None:
        scores_b = run.scorer.score([conv(i, replies_b) for i in keep])
        res.update(compare=run.compare, mean_reward_b=mean_std(scores_b)[0],
                   **win_rate(scores, scores_b))
    samples = []
    for j, i in enumerate(keep[:run.n_samples]):
        s = {"loc": items[i].loc, "prompt": items[i].question, "reply": replies[i], "reward": scores[j]}
        if scores_b is not None:
            s.update(reply_b=replies_b[i], reward_b=scores_b[j])
        samples.append(s)
    res["samples"] = samples
    return res


def _run_lm(task: Task, run: RunContext) -> dict:
    texts = []
    for _, text in iter_input_documents(task.files):
        if run.limit is not None and len(texts) >= run.limit:
            break
        if text.strip():
            texts.append(text)
    if not texts:
        raise UserError(f"task {task.name}: {', '.join(task.files)} holds no text")
    return {"n": len(texts), "files": task.files, **score_documents(run.model, run.tok, texts)}


def run_task(task: Task, run: RunContext, quiet: bool) -> dict:
    """The task's entry of metrics.json: its kind, its figures, samples and where its items came from."""
    if not quiet:
        print(f"evaluating {task.name} ({task.kind}"
              + (f", {len(task.items)} items" if task.items else "") + ")", file=sys.stderr, flush=True)
    if task.kind == "lm":
        r = _run_lm(task, run)
    elif task.kind == "reward":
        r = _run_reward(task, run)
    elif task.kind == "choice":
        r = {**_run_choice(task, run), "template": run.mc_template.path}
    else:
        r = {**_run_generation(task, run), "template": run.template.path}
    if task.pool_source is not None and task.kind != "lm":
        r["pool"] = task.pool_source
    if task.kind != "lm":
        r["files"] = task.files
    if task.never_trained is not None:
        r["never_trained"] = task.never_trained
    return {"kind": task.kind, **r}
