"""chatsmith tasks as lm-evaluation-harness tasks, for `lm_eval --model local-completions` against
`chatsmith serve` (fully offline: local YAML + JSONL, no hub).

`chatsmith lm-eval-tasks --tasks arithmetic quiz mine.jsonl --out DIR` writes, per task,
``DIR/NAME.jsonl`` (one document per item) and ``DIR/NAME.yaml`` (an lm-eval task reading that file
through the ``json`` dataset builder, by absolute path), then

    lm_eval --model local-completions --include_path DIR --tasks NAME ... \\
        --model_args base_url=http://127.0.0.1:8000/v1/completions,model=MODEL,tokenizer_backend=remote,max_length=CTX

Each document's ``prompt`` is the exact text `chatsmith eval --no-chat` would continue (the plain
zero-shot template, earlier turns as "Role: content" lines), so the two tools see the same prompts:

- exact-match tasks -> ``generate_until`` a line break, lm-eval's ``exact_match`` against every
  accepted answer (case, punctuation and surrounding spaces ignored; chatsmith's own checker is more
  lenient with numbers, so the two can differ);
- reference tasks -> ``generate_until``, lm-eval's corpus ``bleu`` and ``chrf`` (sacrebleu);
- multiple-choice tasks -> ``multiple_choice`` (acc, acc_norm) with a " " before each choice, as
  chatsmith scores them. Log-likelihoods need the server's ``echo`` + ``logprobs`` on
  /v1/completions.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from chatsmith.errors import UserError
from chatsmith.flags import Verb
from chatsmith.eval.prompting import fill, load_template
from chatsmith.eval.taskset import resolve_tasks


def _plain_prompt(item, template) -> str:
    # the Prompter's plain rendering without a tokenizer: earlier turns, then the template body
    body = fill(re.sub(r"\n*\{examples\}\n*", "\n\n", template.plain).strip("\n"), {"question": item.question})
    earlier = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in item.messages[:-1])
    return earlier + body


def task_yaml(name: str, data: Path, kind: str, max_gen_toks: int) -> dict:
    cfg = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
           "test_split": "test", "doc_to_text": "{{prompt}}"}
    if kind == "choice":
        cfg.update(output_type="multiple_choice", doc_to_choice="{{choices}}", doc_to_target="label",
                   metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}])
        return cfg
    cfg.update(output_type="generate_until", doc_to_target="{{answers}}" if kind == "exact_match" else "{{references}}",
               generation_kwargs={"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False,
                                  "temperature": 0})
    if kind == "exact_match":
        cfg["doc_to_target"] = "answers"  # a list: lm-eval counts a match with any of them
        cfg["metric_list"] = [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                               "ignore_case": True, "ignore_punctuation": True,
                               "regexes_to_ignore": ["^\\s+", "\\s+$"]}]
    else:
        cfg["doc_to_target"] = "reference"
        cfg["metric_list"] = [{"metric": "bleu", "higher_is_better": True},
                              {"metric": "chrf", "higher_is_better": True}]
    return cfg


def export_tasks(names: list[str], out: str | os.PathLike, heldout: str | None = None, limit: int | None = None,
                 prefix: str = "chatsmith_", max_gen_toks: int = 32, templates_dir=None) -> list[dict]:
    """Write an lm-eval task (YAML + JSONL) per chatsmith task; returns [{name, yaml, data, n}]."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be a positive integer, got {limit!r}")
    template = load_template("zero-shot", templates_dir)
    tasks = resolve_tasks(list(names), heldout, None, False, limit)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for t in tasks:
        if t.kind in ("lm", "reward"):
            raise UserError(f"task {t.name}: {t.kind} tasks have no lm-eval counterpart here; export "
                            f"exact-match, reference or multiple-choice tasks")
        stem = Path(t.name).name
        stem = stem[:-len(Path(stem).suffix)] if t.name.lower().endswith((".jsonl", ".ndjson")) else stem
        name = prefix + re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_")
        rows = []
        for it in t.items:
            row = {"prompt": _plain_prompt(it, template), "source": it.loc}
            if t.kind == "exact_match":
                row["answers"] = it.answers
            elif t.kind == "reference":
                row["reference"] = it.references[0]  # lm-eval's bleu/chrf take one reference per document
            else:
                row.update(choices=it.choices, label=it.label)
            rows.append(row)
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        ypath = out / f"{name}.yaml"
        ypath.write_text(f"# written by `chatsmith lm-eval-tasks` from {t.name}\n"
                         + yaml.safe_dump(task_yaml(name, data, t.kind, max_gen_toks), sort_keys=False,
                                          allow_unicode=True), encoding="utf-8")
        written.append({"task": t.name, "name": name, "kind": t.kind, "yaml": str(ypath), "data": str(data),
                        "n": len(rows)})
    return written


# --- the verb -------------------------------------------------------------------------------------

def add_arguments(p):
    p.add_argument("--tasks", nargs="+", required=True, metavar="NAME",
                   help="arithmetic, word_problem, quiz, or PATH.jsonl task files (exact match, reference, choices)")
    p.add_argument("--out", required=True, help="folder for NAME.yaml + NAME.jsonl (pass it as --include_path)")
    p.add_argument("--heldout", default=None, help="held-out dialogues for the built-in tasks "
                   "(default: data/chat/heldout.jsonl)")
    p.add_argument("--limit", type=int, default=None, help="first N items per task")
    p.add_argument("--prefix", default="chatsmith_", help="prefix of the lm-eval task names")
    p.add_argument("--max-gen-toks", type=int, default=32, help="generation length of generate_until tasks")


def main(a):
    for w in export_tasks(a.tasks, a.out, heldout=a.heldout, limit=a.limit, prefix=a.prefix,
                          max_gen_toks=a.max_gen_toks):
        print(f"{w['name']}: {w['n']} {w['kind'].replace('_', ' ')} items -> {w['yaml']}")
    print(f"run: lm_eval --model local-completions --include_path {a.out} --tasks NAME --model_args "
          f"base_url=http://127.0.0.1:8000/v1/completions,model=MODEL,tokenizer_backend=remote,max_length=CONTEXT")


VERB = Verb("lm-eval-tasks", "write chatsmith tasks as lm-evaluation-harness YAML + JSONL (for lm_eval "
            "--model local-completions against chatsmith serve)", add_arguments, main)
