"""`chatsmith report RUN_DIR`: one report card for a run -> RUN_DIR/report.md + PNG plots.

It reads whatever a run directory holds and renders what exists, so it works on a speedrun
directory (data/, tokenizer/, base/, sft/, reward/, rl/, dpo/, speedrun.json), on a directory
of your own stages, and on a single training output directory:

- every stage directory with ``config.json`` (its ``chatsmith.stage``), ``metrics.jsonl`` (one row
  per log step and per eval), ``train_summary.json``, ``*_eval.json`` (e.g. SFT's
  ``{"base": {...}, "sft": {...}}``: one column per side), ``eval*/metrics.json`` (``chatsmith
  eval``), or ``ngram.json`` (an n-gram model);
- ``speedrun.json`` beside them: seconds per stage, the n-gram baseline, samples.

Sections: the metrics of every stage side by side (one column per stage, blank where a stage
lacks a metric), time and tokens per stage, plots (loss curves, reward/KL curves of RL stages,
accuracy per task family, every other logged metric per stage, time per stage), samples, data.
Metric keys it does not know are tabled and plotted under their own names, never dropped.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from chatsmith import atomic
from chatsmith.data.images import read_set
from chatsmith.errors import UserError
from chatsmith.eval.intervals import RL_COMPARISONS, diff_cell
from chatsmith.flags import Verb

# stages in pipeline order; others follow alphabetically
ORDER = ["data", "tokenizer", "ngram", "base", "pretrain", "sft", "reward", "rl", "rlhf", "ppo", "grpo", "reinforce",
         "adversarial", "dpo"]
COUNTS = {"generated", "n", "heldout_prompts", "heldout", "max_new_tokens"}  # sizes in *_eval.json, not metrics
RL_KINDS = {"rl", "rlhf", "ppo", "grpo", "reinforce", "adversarial"}
RL_KEYS = ("reward", "kl", "entropy", "clip_frac", "value_loss", "response_len")
# bookkeeping in train_summary.json: shown in the time/tokens table, not as metrics
BOOKKEEPING = {"steps", "max_steps", "tokens", "seconds", "interrupted", "elapsed", "tok_per_s", "step"}
NOT_PLOTTED = {"step", "tokens", "elapsed"}
STAGE_FILES = ("metrics.jsonl", "train_summary.json", "config.json", "ngram.json", "tokenizer_stats.json")
# each before/after file evaluates its own prompt set: its rows carry its name, so that one model's
# figures from two prompt sets (SFT's ended share on held-out chats and on the RL prompts) are
# never read as one metric that disagrees with itself
EVALS = {"sft_eval.json": "held-out chats", "rl_eval.json": "held-out RL prompts",
         "reward_eval.json": "held-out pairs", "mlm_eval.json": "held-out masked tokens",
         "classify_eval.json": "classification", "qa_eval.json": "question answering"}
JUDGE = "reward-model judge"  # `chatsmith eval --tasks reward --compare`, the speedrun's DPO-vs-SFT judge

# table labels: whole keys whose words alone would not say what they are, then single words
NAMES = {"assistant_loss": "assistant-token loss", "ended_share": "replies ended (share)",
         "kl_to_ref": "KL to the reference (nats per reply)", "top_answer_share": "share of the most common answer",
         "exact_match_all": "exact match: all families", "win_rate_ci95": "win rate 95% CI (±)",
         "tok_per_s": "tokens per second", "grad_norm": "gradient norm", "lr": "learning rate",
         "reward_std": "reward standard deviation", "accuracy_norm": "accuracy (length-normalised)",
         "mean_reward_b": "mean reward of the compared model", "kl_k3": "KL to the reference (k3, per token)",
         "approx_kl": "KL to the rollout policy (per token)", "chosen_nll": "chosen reply NLL (per token)",
         "dpo_loss": "DPO loss", "kept_share": "groups kept (share)", "kl_coef": "KL coefficient",
         "response_len": "reply length (tokens)", "clip_frac": "clipped share",
         "kl": "KL to the reference (nats per reply)"}
WORDS = {"heldout": "held-out", "kl": "KL", "bpb": "bits per byte", "nll": "NLL", "bleu": "BLEU", "chrf": "chrF",
         "f1": "F1", "ppl": "perplexity", "acc": "accuracy", "vs": "vs"}


def human(key: str) -> str:
    """A logged key as a label: "heldout_loss" -> "held-out loss", "exact_match/word_problem" ->
    "exact match: word problem"; unknown keys keep their words, never their underscores."""
    out = []
    for part in str(key).split("/"):
        pre = ""
        if part.startswith("heldout_"):
            pre, part = "held-out ", part[len("heldout_"):]
        out.append(pre + NAMES.get(part, " ".join(WORDS.get(w.lower(), w) for w in part.split("_") if w)))
    return ": ".join(out)


@dataclass
class Stage:
    name: str                     # the directory name: the column header
    path: Path
    kind: str                     # config.json's chatsmith.stage, or "ngram"/"tokenizer"/the name
    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    bad_rows: int = 0
    config: dict = field(default_factory=dict)  # config.json's "chatsmith" block (stage, rl_config, rpo_alpha, …)

    @property
    def rpo_alpha(self) -> float:
        """DPO's weight of the chosen reply's NLL: >0 means its train loss is DPO + α·NLL, not the
        DPO loss its held-out evaluation measures."""
        a = self.config.get("rpo_alpha")
        return float(a) if _is_num(a) else 0.0


def invalid_utf8(text: str) -> int:
    """Invalid UTF-8 sequences a byte-level model emitted in `text`: each one that could not complete
    decodes to one U+FFFD (streaming holds back a sequence while it still can complete)."""
    return text.count("\ufffd")


def _read_json(path: Path):
    """A JSON file or None: a report never fails on one unreadable file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_rows(path: Path) -> tuple[list[dict], int]:
    rows, bad = [], 0
    if not path.is_file():
        return rows, bad
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError:  # e.g. the last line of a killed run
                bad += 1
                continue
            if isinstance(r, dict) and isinstance(r.get("step"), (int, float)):
                rows.append(r)
            else:
                bad += 1
    return rows, bad


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_stage(path: Path, name: str | None = None) -> Stage | None:
    if not any((path / f).is_file() for f in STAGE_FILES):
        return None
    cfg = _read_json(path / "config.json") or {}
    kind = (cfg.get("chatsmith") or {}).get("stage") if isinstance(cfg, dict) else None
    if kind is None:
        kind = "ngram" if (path / "ngram.json").is_file() else (
            "tokenizer" if (path / "tokenizer_stats.json").is_file() else (name or path.name))
    st = Stage(name or path.name, path, kind)
    block = cfg.get("chatsmith") if isinstance(cfg, dict) else None
    st.config = block if isinstance(block, dict) else {}
    st.rows, st.bad_rows = _read_rows(path / "metrics.jsonl")
    summary = _read_json(path / "train_summary.json")
    st.summary = summary if isinstance(summary, dict) else {}
    return st


def find_stages(run_dir: Path) -> list[Stage]:
    """The stage directories of a run, in pipeline order; the run directory itself when it is a
    single training output."""
    own = load_stage(run_dir)
    if own is not None and own.kind != "tokenizer":
        return [own]
    stages = [s for d in sorted(p for p in run_dir.iterdir() if p.is_dir())
              if (s := load_stage(d)) is not None]

    def key(s: Stage):
        for i, k in enumerate(ORDER):
            if s.name == k or s.kind == k:
                return (i, s.name)
        return (len(ORDER), s.name)

    return sorted(stages, key=key)


# --------------------------------------------------------------------------- collecting metrics

class Table:
    """metric -> column -> value, in insertion order."""

    def __init__(self):
        self.cells: dict[str, dict[str, float]] = {}
        self.columns: list[str] = []

    def put(self, metric: str, col: str, v, override: bool = True):
        if not _is_num(v):
            return
        if col not in self.columns:
            owner = col.split(": ")[0]
            # a stage's "before" side ("rl: init") sits just left of the stage itself
            if ": " in col and owner in self.columns:
                self.columns.insert(self.columns.index(owner), col)
            else:
                self.columns.append(col)
        row = self.cells.setdefault(metric, {})
        if override or col not in row:
            row[col] = float(v)


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    """Numbers of a (nested) metrics dict under "a/b" keys; lists and strings are skipped."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif _is_num(v):
            out[f"{prefix}{k}"] = v
    return out


def _norm(key: str) -> str:
    """A metric key without its held-out prefix and separators, to spot one metric under two names;
    SFT's held-out loss is its assistant-token loss (the same tokens of the same held-out chats)."""
    n = re.sub(r"[\s_/:]+", " ", re.sub(r"^(held-out |heldout_)", "", key)).strip()
    return "loss" if n == "assistant loss" else n


def _column_for(side: str, stages: list[Stage], owner: Stage | None = None) -> str:
    """The column of one side of a before/after file: the stage of that name or kind, else a
    column named after the file's stage ("rl: init", "reward: untrained_head")."""
    for s in stages:
        if side in (s.name, s.kind):
            return s.name
    return f"{owner.name}: {side}" if owner is not None else side


def collect_metrics(stages: list[Stage], speedrun: dict | None) -> Table:
    t = Table()
    for s in stages:
        if s.kind in ("tokenizer",):
            continue
        if s.name not in t.columns:
            t.columns.append(s.name)
        summary = []  # final-eval numbers of train_summary.json, tabled after the *_eval.json files
        for k, v in s.summary.items():
            if k not in BOOKKEEPING and _is_num(v):
                summary.append((k, v))
            # a flat dict of numbers (e.g. per-family scores); "data" is bookkeeping and "eval"
            # repeats the *_eval.json file read below
            elif isinstance(v, dict) and k not in ("data", "eval") and all(_is_num(x) for x in v.values()):
                summary += [(f"{k}/{kk}", vv) for kk, vv in v.items()]
        from_eval: set[str] = set()
        if s.kind != "ngram" and s.rows and not any(k == "loss" for k in s.summary):
            train = [r for r in s.rows if _is_num(r.get("loss"))]
            if train:
                t.put("final train loss", s.name, train[-1]["loss"])
        # before/after files such as sft_eval.json: one column per side; the stage's own side wins
        for f in sorted(s.path.glob("*_eval.json")):
            d = _read_json(f)
            if not isinstance(d, dict):
                continue
            label = eval_label(f.name)
            for side, m in d.items():
                if isinstance(m, dict):
                    col = _column_for(side, stages, s)
                    for k, v in _flatten(m).items():
                        if k in COUNTS:
                            continue
                        name = k[len("heldout_"):] if k.startswith("heldout_") else k
                        t.put(f"{label}: {human(name)}", col, v, override=col == s.name)
                        if col == s.name:
                            from_eval.add(_norm(name))
        # the stage's final eval repeats its own side of the *_eval.json under other names
        # (exact_match/arithmetic, heldout_accuracy): keep one row per metric
        for k, v in summary:
            if _norm(k) not in from_eval:
                t.put(human(k), s.name, v)
        for f in sorted(s.path.glob("eval*/metrics.json")):
            d = _read_json(f)
            if not isinstance(d, dict) or not isinstance(d.get("tasks"), dict):
                continue
            mode = d.get("mode", "zero-shot")
            tag = "" if mode == "zero-shot" else f" [{mode}{', k=' + str(d['k']) if d.get('k') else ''}]"
            for task, r in d["tasks"].items():
                if isinstance(r, dict):
                    _put_task(t, stages, s, task, tag, r)
        if s.kind == "ngram":
            meta = _read_json(s.path / "ngram.json") or {}
            for k in ("order", "tokens", "documents"):
                v = meta.get(k, (meta.get("info") or {}).get(k)) if isinstance(meta, dict) else None
                t.put(f"n-gram {k}", s.name, v)
    base = (speedrun or {}).get("baseline") or {}
    for k, v in base.items():
        m = re.fullmatch(r"ngram(\d+)(?:_(.+))?_val_bpb", k)
        if m:  # ngram3_val_bpb, ngram3_same_tokens_val_bpb (counted on as many tokens as the neural model saw)
            col = f"{m.group(1)}-gram" + (f" ({m.group(2).replace('_', ' ')})" if m.group(2) else "")
            t.put("val bits-per-byte (all val documents)", col, v)
        elif k == "neural_val_bpb":
            col = next((s.name for s in stages if s.kind == "pretrain"), "base")
            t.put("val bits-per-byte (all val documents)", col, v)
    # the speedrun's reward-model judge (the same `chatsmith eval` result as DPO's eval/metrics.json,
    # so the same rows): mean reward per model, win rate of one model over another
    judge = (speedrun or {}).get("judge") or {}
    winner = None
    for k, v in judge.items():
        m = re.fullmatch(r"(.+)_win_rate_vs_(.+)", k)
        if m:
            winner = _column_for(m.group(1), stages)
            t.put(f"{JUDGE}: win rate vs {m.group(2)}", winner, v)
        elif k.endswith("_mean_reward"):
            t.put(f"{JUDGE}: mean reward", _column_for(k[:-len("_mean_reward")], stages), v)
    if winner is not None:
        t.put(f"{JUDGE}: {human('win_rate_ci95')}", winner, judge.get("win_rate_ci95"))
    return t


# per-item counts and tallies of `chatsmith eval` tasks: sizes, not metrics
TASK_COUNTS = {"n", "correct", "correct_norm", "too_long", "truncated", "fewer_shots", "shots_mean", "tokens",
               "bytes", "brevity_penalty", "wins", "ties", "losses"}


def _put_task(t: Table, stages: list[Stage], s: Stage, task: str, tag: str, r: dict):
    """One `chatsmith eval` task's figures. A reward task run with --compare is the reward-model
    judge: its second model's mean reward goes into that model's column, not into a row of its own."""
    label = f"`{Path(task).name}`" if task.endswith(".jsonl") else human(task)
    other = Path(str(r.get("compare"))).name if r.get("compare") else None
    if r.get("kind") == "reward" and other and "win_rate" in r:
        col_b = _column_for(other, stages)
        t.put(f"{JUDGE}{tag}: mean reward", s.name, r.get("mean_reward"))
        t.put(f"{JUDGE}{tag}: mean reward", col_b, r.get("mean_reward_b"), override=False)
        t.put(f"{JUDGE}{tag}: win rate vs {other}", s.name, r["win_rate"])
        t.put(f"{JUDGE}{tag}: {human('win_rate_ci95')}", s.name, r.get("win_rate_ci95"))
        return
    for k, v in r.items():
        if k not in TASK_COUNTS and _is_num(v):
            t.put(f"{label}{tag}: {human(k)}", s.name, v)


def eval_label(filename: str) -> str:
    """The name of the prompt set a before/after file evaluates ("held-out chats")."""
    return EVALS.get(filename, filename[:-len("_eval.json")].replace("_", " ") + " eval")


def collect_time(stages: list[Stage], speedrun: dict | None) -> list[dict]:
    """Rows {stage, seconds, steps, tokens} in order: speedrun's record of every stage (data and
    tokenizer too), completed by each stage directory's train_summary.json."""
    rows: dict[str, dict] = {}
    for k, v in ((speedrun or {}).get("stages") or {}).items():
        if isinstance(v, dict):
            label = _column_for(k, stages)
            rows[label] = {"stage": label, "seconds": v.get("seconds"), "steps": v.get("steps"),
                           "tokens": v.get("tokens")}
    for s in stages:
        r = rows.setdefault(s.name, {"stage": s.name})
        for k in ("seconds", "steps", "tokens"):
            if r.get(k) is None and _is_num(s.summary.get(k)):
                r[k] = s.summary[k]
        if r.get("tokens") is None and s.rows:
            toks = [x["tokens"] for x in s.rows if _is_num(x.get("tokens"))]
            r["tokens"] = toks[-1] if toks else None
        if r.get("steps") is None and s.rows:
            r["steps"] = max(int(x["step"]) for x in s.rows)
    return [r for r in rows.values() if any(r.get(k) is not None for k in ("seconds", "steps", "tokens"))]


# --------------------------------------------------------------------------- plots

def _figure(n_panels: int, width: float = 4.8, height: float = 3.3, cols: int | None = None):
    # matplotlib's object API with the Agg canvas: no display, no global pyplot state (safe in tests
    # and in a server process); the constrained layout makes room for a figure title and legends
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = cols or min(n_panels, 2 if n_panels == 4 else 3)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if _is_num(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


SHORT = 12  # a series of fewer points is drawn as points with markers: a line between 3 points invents a curve


def _line(ax, rows: list[dict], key: str, label: str | None = None):
    """One logged key as a line; where eval rows log it too (an RL stage's held-out ended_share
    beside its rollouts' ended_share), the eval points are a series of their own."""
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "loss" not in r]
    parts = [(rows, key, label)]
    if any(_is_num(r.get(key)) for r in train) and any(_is_num(r.get(key)) for r in evals):
        parts = [(train, key, label), (evals, f"{key} (held-out)", f"{label or human(key)} (held-out)")]
    for part, gid, lab in parts:
        x, y = _series(part, key)
        if not x:
            continue
        short = len(x) < SHORT or key.startswith("heldout_") or part is evals  # evals come every few hundred steps
        (ln,) = ax.plot(x, y, "o-" if short else "-", label=lab, markersize=5 if len(x) < SHORT else 3,
                        linewidth=1.0 if short else 1.3, alpha=0.9)
        ln.set_gid(gid)  # the logged key, for tests and for anyone reading the figure back


def _step_axis(ax, steps: list[float]):
    """Steps are whole numbers: integer ticks, and with a handful of logged steps exactly those."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    uniq = sorted(set(steps))
    if 1 < len(uniq) <= 6:
        ax.xaxis.set_major_locator(FixedLocator(uniq))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(uniq) == 1:  # one point: a window of a step either side, not fractional steps
        ax.set_xlim(uniq[0] - 1, uniq[0] + 1)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def _steps_of(rows: list[dict], keys) -> list[float]:
    return [r["step"] for r in rows for k in keys if _is_num(r.get(k))]


def _loss_keys(s: Stage) -> list[str]:
    return sorted({k for r in s.rows for k, v in r.items() if k.endswith("loss") and k not in RL_KEYS and _is_num(v)},
                  key=lambda k: (k != "loss", k))


def _spread(rows: list[dict], keys: list[str]) -> float:
    """How many times larger the largest series' median is than the smallest's (scale check)."""
    med = []
    for k in keys:
        ys = sorted(abs(v) for v in _series(rows, k)[1])
        if ys:
            med.append(ys[len(ys) // 2])
    return max(med) / max(min(med), 1e-12) if len(med) > 1 else 1.0


def loss_panels(s: Stage) -> list[tuple[str, list[str]]]:
    """(title, keys) per panel of one stage's losses. A train loss shares an axis with its held-out
    loss only when both measure the same thing on a like scale: DPO with RPO trains on DPO + α·NLL
    (~4 nats) and evaluates the DPO loss alone (~0.7), so its objective gets a panel of its own and
    the DPO part it logs (dpo_loss) is the one drawn against the held-out loss."""
    keys = _loss_keys(s)
    if not keys:
        return []
    panels, rest = [], list(keys)
    train = "loss"
    if s.kind == "dpo" and s.rpo_alpha > 0 and "loss" in rest:
        panels.append((f"{s.name}: train objective, DPO + {s.rpo_alpha:g}·NLL", ["loss"]))
        rest.remove("loss")
        train = "dpo_loss"
    # a train loss, its held-out twins, and (RL) the policy loss it is the sum of with the KL or value terms
    parts = ("policy_loss",) if s.kind in RL_KINDS else ()
    main = [k for k in (train, *(k for k in rest if k.startswith(("heldout_", "val_")) or k in parts)) if k in rest]
    if len(main) > 1 and _spread(s.rows, main) > 4:  # not one quantity, whatever the names say
        main = main[:1]
    if main:
        title = f"{s.name} ({s.kind})" if s.kind != s.name else s.name
        panels.append((f"{title}: {human(train) if train != 'loss' else 'loss'}", main))
    panels += [(f"{s.name}: {human(k)}", [k]) for k in rest if k not in main]
    return panels


def loss_figure(stages: list[Stage]):
    panels = [(s, title, keys) for s in stages for title, keys in loss_panels(s)]
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, (s, title, keys) in zip(axes, panels):
        for k in keys:
            _line(ax, s.rows, k, "train" if k in ("loss", "dpo_loss") else human(k))
        ax.set_title(title, fontsize=11)
        # units where the stage says what they are: LM losses per token, Bradley–Terry and DPO per pair
        unit = ("nats per token" if s.kind in ("pretrain", "sft") and keys[0] == "loss" else
                "nats per pair" if s.kind == "reward" or "dpo_loss" in keys else "loss")
        ax.set_ylabel(unit)
        _step_axis(ax, _steps_of(s.rows, keys))
        if len(keys) > 1:
            ax.legend(fontsize=8)
    return fig


def plot_losses(stages: list[Stage], out: Path) -> Path | None:
    fig = loss_figure(stages)
    return None if fig is None else _save(fig, out / "loss.png")


def rl_keys(stages: list[Stage]) -> tuple[list[str], list[str]]:
    """The RL keys worth a panel, and notes on those that never change (GRPO's clip share of 0)."""
    keys, notes = [], []
    for k in RL_KEYS:
        ys = [y for s in stages for y in _series(s.rows, k)[1]]
        if len(set(ys)) > 1:
            keys.append(k)
        elif ys:
            notes.append(f"{human(k)} {fmt(ys[0])} ({'one value' if len(ys) == 1 else 'constant'})")
    return keys, notes


def rl_figure(stages: list[Stage]):
    keys, _ = rl_keys(stages)
    if not keys:
        return None
    fig, axes = _figure(len(keys))
    for ax, k in zip(axes, keys):
        steps = []
        for s in stages:
            if any(_is_num(r.get(k)) for r in s.rows):
                _line(ax, s.rows, k, s.name)
                steps += _steps_of(s.rows, [k])
        ax.set_title(human(k), fontsize=11)
        _step_axis(ax, steps)
        if len(ax.lines) > 1:  # one RL stage needs no legend: the section names it
            ax.legend(fontsize=8)
    return fig


def plot_rl(stages: list[Stage], out: Path) -> Path | None:
    fig = rl_figure(stages)
    return None if fig is None else _save(fig, out / "reward_kl.png")


def other_panels(stage: Stage, done: set[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Panels of every other numeric key the stage logged (lr, grad_norm, tok/s, new ones), fewer
    and larger: a key and its held-out twin (accuracy, heldout_accuracy), the parts of one metric
    (exact_match/arithmetic, …, exact_match_all), chosen/rejected pairs and shares of replies each
    share a panel. A key that never changes, or has one value, is named in the text (returned
    second) instead of taking a panel."""
    keys = sorted({k for r in stage.rows for k, v in r.items() if _is_num(v)} - NOT_PLOTTED - done)
    notes, live = [], []
    varies = {k for k in keys if len(set(_series(stage.rows, k)[1])) > 1}
    for k in keys:
        ys = _series(stage.rows, k)[1]
        if k.startswith("heldout_") and k[len("heldout_"):] in varies:
            live.append(k)  # a final held-out point beside its train curve says how far apart they are
        elif len(ys) < 2:
            notes.append(f"{human(k)} {fmt(ys[0])} (one value)")
        elif max(ys) == min(ys):
            notes.append(f"{human(k)} {fmt(ys[0])} (constant)")
        else:
            live.append(k)
    groups: dict[str, list[str]] = {}
    for k in live:
        base = k[len("heldout_"):] if k.startswith("heldout_") else k
        if "/" in base:
            g = base.split("/")[0]
        elif any(base.startswith(p.split("/")[0] + "_") for p in live if "/" in p):
            g = next(p.split("/")[0] for p in live if "/" in p and base.startswith(p.split("/")[0] + "_"))
        elif base.endswith(("_chosen", "_rejected")):
            g = base.rsplit("_", 1)[0] + ": chosen and rejected"
        elif base.endswith("_share") and sum(x.endswith("_share") for x in live) > 1:
            g = "shares of replies"
        else:
            g = base
        groups.setdefault(g, []).append(k)
    for ks in groups.values():  # the train series first (the first colour), its held-out twin after it
        ks.sort(key=lambda k: k.startswith("heldout_"))
    return [(human(g) if len(ks) > 1 else human(ks[0]), ks) for g, ks in groups.items()], notes


def other_figure(stage: Stage, done: set[str]):
    panels, notes = other_panels(stage, done)
    if not panels:
        return None, notes
    fig, axes = _figure(len(panels), 4.6, 3.2)
    for ax, (title, ks) in zip(axes, panels):
        for k in ks:
            _line(ax, stage.rows, k, human(k) if len(ks) > 1 else None)
        ax.set_title(title, fontsize=11)
        _step_axis(ax, _steps_of(stage.rows, ks))
        if len(ks) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(f"{stage.name}: other logged metrics", fontsize=13)
    return fig, notes


def plot_other(stage: Stage, out: Path, done: set[str]) -> tuple[Path | None, list[str]]:
    fig, notes = other_figure(stage, done)
    if fig is None:
        return None, notes
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stage.name)
    return _save(fig, out / f"metrics_{safe}.png"), notes


def accuracy_rows(t: Table) -> dict[str, dict[str, dict[str, float]]]:
    """Accuracy per task family, per prompt set: {"held-out chats": {"arithmetic": {column: value}}}
    from the before/after files' exact match, {"chatsmith eval": {task: …}} from `chatsmith eval`."""
    acc: dict[str, dict[str, dict[str, float]]] = {}
    evals = set(EVALS.values())
    for m, cells in t.cells.items():
        head, _, rest = m.partition(": exact match: ")
        if rest and head in evals and rest != "all families":
            acc.setdefault(head, {})[rest] = cells
        elif m.endswith(": accuracy") and m.split(": ")[0] not in evals:
            acc.setdefault("chatsmith eval", {})[m[:-len(": accuracy")]] = cells
    return acc


def accuracy_figure(t: Table):
    """One panel per prompt set, with the columns measured on it: bars of different prompt sets
    are never side by side."""
    acc = accuracy_rows(t)
    if not acc:
        return None
    sets = list(acc)
    widths = []
    for name in sets:
        cols = [c for c in t.columns if any(c in cells for cells in acc[name].values())]
        widths.append(max(3.2, 0.55 * len(acc[name]) * (len(cols) + 1) + 1.2))
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(sum(widths), 16), 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(sets), squeeze=False, sharey=True, width_ratios=widths)[0]
    for ax, name in zip(axes, sets):
        fams = list(acc[name])
        cols = [c for c in t.columns if any(c in cells for cells in acc[name].values())]
        w = 0.8 / len(cols)
        for j, c in enumerate(cols):
            xs = [i + (j - (len(cols) - 1) / 2) * w for i in range(len(fams))]
            vals = [acc[name][f].get(c) for f in fams]
            bars = ax.bar(xs, [v or 0.0 for v in vals], width=w, label=c)
            # the value on each bar, so a zero is told apart from a missing stage ("–")
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, (v or 0.0) + 0.01, "–" if v is None else f"{v:.0%}",
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(fams)))
        ax.set_xticklabels(fams, rotation=20 if len(fams) > 3 else 0, ha="right" if len(fams) > 3 else "center",
                           fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=11)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="upper right")
    axes[0].set_ylabel("exact match / accuracy")
    fig.suptitle("accuracy per task family, per prompt set", fontsize=12)
    return fig


def plot_accuracy(t: Table, out: Path) -> Path | None:
    fig = accuracy_figure(t)
    return None if fig is None else _save(fig, out / "accuracy.png")


def plot_time(rows: list[dict], out: Path) -> Path | None:
    rows = [r for r in rows if _is_num(r.get("seconds"))]
    if not rows:
        return None
    fig, (ax,) = _figure(1, 6, 0.5 + 0.45 * len(rows))
    ax.barh([r["stage"] for r in rows][::-1], [r["seconds"] for r in rows][::-1])
    ax.set_xlabel("seconds")
    ax.set_title("time per stage")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, out / "time.png")


def clip_figures(stages: list[Stage]) -> list[tuple[str, Path, dict]]:
    """(stage name, eval dir, set name -> figures) of every `chatsmith eval --tasks clip` run found."""
    out = []
    for s in stages:
        for f in sorted(s.path.glob("eval*/clip_figures.json")):
            d = _read_json(f)
            if isinstance(d, dict):
                out.append((s.name, f.parent, d))
    return out


def plot_clip(stages: list[Stage], out: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """For each clip eval: a grid of the top matches of its text queries (images re-read from the
    evaluated set) and the zero-shot confusion matrix. Returns the plots and notes on what was not drawn."""
    plots, notes = [], []
    for stage, ev, sets in clip_figures(stages):
        for name, fig_data in sets.items():
            tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{stage}_{name}")
            conf = fig_data.get("confusion")
            if conf:
                labels, m = conf["labels"], conf["matrix"]
                fig, (ax,) = _figure(1, width=2.5 + 0.55 * len(labels), height=2.0 + 0.5 * len(labels))
                ax.imshow(m, cmap="Blues")
                ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
                ax.set_yticks(range(len(labels)), labels)
                ax.set_xlabel("predicted (zero-shot)")
                ax.set_ylabel("true class")
                top = max(max(r) for r in m) or 1
                for i, row in enumerate(m):
                    for j, v in enumerate(row):
                        ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                                color="white" if v > top / 2 else "black")
                fig.suptitle(f"zero-shot confusion: {name} ({stage})")
                plots.append((f"Zero-shot confusion matrix: {name}", _save(fig, out / f"clip_confusion_{tag}.png")))
            matches = fig_data.get("matches") or []
            try:
                images = read_set(fig_data["set"]).images if matches else None
            except (UserError, OSError, KeyError) as e:
                notes.append(f"top matches of {name}: the evaluated images are not readable ({e})")
                continue
            if not matches:
                continue
            k = max(len(q["images"]) for q in matches)
            fig, axes = _figure(len(matches) * k, width=1.3, height=1.45, cols=k)
            for r, q in enumerate(matches):
                for c in range(k):
                    ax = axes[r * k + c]
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if c < len(q["images"]):
                        ax.imshow(images[q["images"][c]], interpolation="nearest")
                        ax.set_title(f"{q['scores'][c]:.3f}", fontsize=7)
                    if c == 0:
                        ax.set_ylabel(_short(q["query"], 28), fontsize=7, rotation=0, ha="right", va="center")
            fig.suptitle(f"top matches per text query: {name} (cosine similarity above each image)")
            plots.append((f"Top matches: {name}", _save(fig, out / f"clip_matches_{tag}.png")))
    return plots, notes


# --------------------------------------------------------------------------- markdown

def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1000:
        v = int(v)
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"


def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list], numeric: bool = True) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join("---" if i == 0 or not numeric else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _short(x, limit: int = 120) -> str:
    x = str(x)
    return x if len(x) < limit else x[:limit] + " …"


def _block(text: str, limit: int = 600) -> str:
    text = text if len(text) <= limit else text[:limit] + " …"
    return "~~~text\n" + text.replace("~~~", "~ ~ ~") + "\n~~~"


def samples_md(stages: list[Stage], speedrun: dict | None) -> list[str]:
    out = []
    sr = speedrun or {}
    if sr.get("samples"):
        out.append("### Base model completions (temperature 0.8)\n")
        for s in sr["samples"]:
            out.append(_block(f"{s.get('prompt', '')}{s.get('completion', '')}"))
        smp = ((sr.get("stages") or {}).get("samples") or {})
        if _is_num(smp.get("invalid_utf8_sequences")):
            out.append(f"\nThe byte-level model emitted {smp['invalid_utf8_sequences']} invalid UTF-8 "
                       f"sequence(s) in these {fmt(smp.get('sample_characters'))} characters (each shown "
                       f"as U+FFFD; a character split across tokens is never one of them).\n")
    conv = sr.get("conversation")
    # one conversation (a list of turns) or one per model ({"sft": [...], "dpo": [...]})
    convs = conv if isinstance(conv, dict) else {"chat model": conv} if isinstance(conv, list) else {}
    for name, turns in convs.items():
        if isinstance(turns, list) and turns:
            out.append(f"\n### {name}, greedy\n")
            out.append(_block("\n".join(f"you> {c.get('user', '')}\nbot> {c.get('assistant', '')}"
                                        for c in turns if isinstance(c, dict)), 2000))
    examples = ((sr.get("judge") or {}).get("examples") or []) if isinstance(sr.get("judge"), dict) else []
    examples = [e for e in examples if isinstance(e, dict)]
    if examples:
        names = [k for k in examples[0] if k != "prompt"]
        out.append("\n### Replies the reward-model judge compared\n")
        out.append(md_table(["prompt", *names], [[_short(e.get("prompt", "")), *(_short(e.get(n, "")) for n in names)]
                                                 for e in examples], numeric=False))
    for s in stages:
        for f in sorted(s.path.glob("*_eval.json")):
            d = _read_json(f)
            if not isinstance(d, dict):
                continue
            for side, m in d.items():
                smp = m.get("samples") if isinstance(m, dict) else None
                if not smp or _column_for(side, stages, s) != s.name:
                    continue
                out.append(f"\n### {s.name}: held-out replies ({f.name})\n")
                rows = [[x.get("family", ""), x.get("prompt", ""), x.get("reply", ""), x.get("reference", "")]
                        for x in smp[:9] if isinstance(x, dict)]
                out.append(md_table(["family", "prompt", "reply", "reference"],
                                    [[_short(c) for c in r] for r in rows],
                                    numeric=False))
    return out


def _pct_ci(v, ci=None, counts=None) -> str:
    if not _is_num(v):
        return "-"
    cell = f"{v:.0%}"
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_num(x) for x in ci):
        cell += f" [{ci[0]:.0%}, {ci[1]:.0%}]"
    if isinstance(counts, (list, tuple)) and len(counts) == 2 and _is_num(counts[1]):
        cell += f" (n={counts[1]})"
    return cell


def chain_md(speedrun: dict | None) -> list[str]:
    """`speedrun --from MODEL`: one row per stage (the imported model, then each trained one), all
    measured on the same held-out items by chatsmith/speedrun_from.py's evaluation."""
    rows = (speedrun or {}).get("chain")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        return []
    fams = list(rows[0].get("exact_match") or {})
    head = ["stage", *(f"{f} exact match" for f in fams), "facts known", "retention", "identity",
            "judge vs previous", "KL to imported", "train s", "tokens", "eval s"]
    body = []
    for r in rows:
        em, ci, cnt = r.get("exact_match") or {}, r.get("exact_match_ci95") or {}, r.get("exact_match_counts") or {}
        fk, rc, ic = r.get("facts_known") or [None, None], r.get("retention_counts") or [None, None], \
            r.get("identity_counts") or [None, None]
        body.append([r.get("stage"), *(_pct_ci(em.get(f), ci.get(f), cnt.get(f)) for f in fams),
                     f"{fk[0]}/{fk[1]}" if fk[1] else "-",
                     f"{_pct_ci(r.get('retention'))} ({rc[0]}/{rc[1]})" if _is_num(r.get("retention")) else "-",
                     f"{_pct_ci(r.get('identity'))} ({ic[0]}/{ic[1]})" if _is_num(r.get("identity")) else "-",
                     _pct_ci(r.get("judge_vs_previous")), fmt(r.get("kl_to_imported")), fmt(r.get("train_seconds")),
                     fmt(r.get("tokens")), fmt(r.get("eval_seconds"))])
    out = [f"From `{speedrun.get('from')}` as {speedrun.get('name')!r}: every stage evaluated on the same "
           f"held-out items ({speedrun.get('eval_items_per_family')} per task family; greedy; 95% Wilson "
           f"intervals). Retention: the share of the facts the imported model answered correctly (held-out "
           f"bsdgames quiz items and WordNet definitions, 4-way choice by likelihood) that the stage still "
           f"answers correctly. Identity: held-out phrasings answered with the name. Judge: the reward model "
           f"prefers this stage's greedy reply over the previous stage's (ties count half). KL: nats per "
           f"sampled reply to the imported model.", "",
           md_table(head, body, numeric=False), ""]
    out += paired_md(rows, "stage", "exact match minus the stage before's on the same items")
    j = (speedrun.get("judge") or {}).get("dpo_vs_sft")
    if isinstance(j, dict) and _is_num(j.get("win_rate")):
        out += [f"DPO vs SFT by the reward model: preferred on {_pct_ci(j['win_rate'], j.get('win_rate_ci95'))} of "
                f"{j.get('prompts')} held-out prompts ({j.get('wins')} wins, {j.get('ties')} ties, "
                f"{j.get('losses')} losses).", ""]
    rev = speedrun.get("reward_eval") or {}
    acc = (rev.get("reward") or {}).get("heldout_accuracy") if isinstance(rev, dict) else None
    if _is_num(acc):
        out += [f"Reward model: held-out pairwise accuracy {acc:.1%} (untrained head "
                f"{fmt((rev.get('untrained_head') or {}).get('heldout_accuracy'))}).", ""]
    return out


def _diff_cell(d) -> str:
    if not (isinstance(d, dict) and all(_is_num(d.get(k)) for k in ("diff", "gained", "lost"))
            and isinstance(d.get("ci95"), (list, tuple)) and len(d["ci95"]) == 2 and all(map(_is_num, d["ci95"]))):
        return "-"
    return diff_cell(d)


def paired_md(rows: list[dict], key: str, what: str) -> list[str]:
    """A table of paired differences in points: one row per entry of `rows` that has
    `exact_match_vs_previous` ({family: paired_difference}), labelled by rows[i][key]."""
    rows = [r for r in rows if isinstance(r.get("exact_match_vs_previous"), dict) and r["exact_match_vs_previous"]]
    if not rows:
        return []
    fams = list(rows[0]["exact_match_vs_previous"])
    body = [[r.get(key), *(_diff_cell(r["exact_match_vs_previous"].get(f)) for f in fams)] for r in rows]
    return [f"Change in points ({what}; Newcombe's paired 95% interval; items gained/lost):", "",
            md_table([key, *fams], body, numeric=False), ""]


def rl_control_md(rl_eval: dict | None) -> list[str]:
    """RL against its same-compute SFT control and the checkpoint both started from (an rl_eval.json
    with a "control" side: `rlhf --control-sft`, the speedrun): per family exact match with its 95%
    Wilson interval and item count, the most common answer's share, KL to the start, replies ended."""
    if not isinstance(rl_eval, dict) or not isinstance(rl_eval.get("control"), dict):
        return []
    sides = [k for k in ("init", "rl", "control") if isinstance(rl_eval.get(k), dict)]
    fams = list(rl_eval[sides[0]].get("exact_match") or {})
    head = ["policy", *(f"{f} exact match" for f in fams), "most common answer's share", "KL to start", "ended"]
    body = []
    for k in sides:
        r = rl_eval[k]
        em, ci, cnt = r.get("exact_match") or {}, r.get("exact_match_ci95") or {}, r.get("exact_match_counts") or {}
        body.append([{"init": "start (SFT)", "rl": "RL", "control": "control (more SFT)"}[k],
                     *(_pct_ci(em.get(f), ci.get(f), cnt.get(f)) for f in fams),
                     _pct_ci(r.get("top_answer_share")), fmt(r.get("kl_to_ref")), _pct_ci(r.get("ended_share"))])
    diffs = [{"comparison": label, "exact_match_vs_previous": rl_eval.get(k)}
             for k, label in RL_COMPARISONS]
    return ["Held-out prompts of the verifiable families, greedy; 95% Wilson intervals. The control continues "
            "SFT from the same checkpoint for RL's optimizer work (tokens per step and steps); a jump in the "
            "most common answer's share says a policy learned an answer prior rather than the task.", "",
            md_table(head, body, numeric=False), "",
            *paired_md(diffs, "comparison", "the same held-out items")]


def evals_md(stages: list[Stage]) -> list[str]:
    """What each prompt set is: its file, how many replies, to which families, how long they may be;
    and what a DPO stage's train loss is when it is not the DPO loss."""
    out = []
    for s in stages:
        for f in sorted(s.path.glob("*_eval.json")):
            d = _read_json(f)
            sides = {k: v for k, v in d.items() if isinstance(v, dict)} if isinstance(d, dict) else {}
            if not sides:
                continue
            own = sides.get(next((k for k in sides if _column_for(k, stages, s) == s.name), ""), {})
            bits = []
            n = own.get("generated", own.get("heldout_prompts", (s.summary.get("data") or {}).get("heldout")))
            if _is_num(n):
                bits.append(f"{fmt(n)} items")
            rl_cfg = s.config.get("rl_config") if isinstance(s.config.get("rl_config"), dict) else {}
            limit = own.get("max_new_tokens", rl_cfg.get("max_new_tokens"))
            if _is_num(limit):
                bits.append(f"greedy replies of up to {fmt(limit)} new tokens")
            fams = sorted({k for m in sides.values() for k in (m.get("exact_match") or {})
                           if isinstance(m.get("exact_match"), dict)})
            if fams:
                bits.append("families " + ", ".join(fams))
            cols = []
            for k in sides:
                col = _column_for(k, stages, s)
                # "rl: init": the model the stage started from, measured on the stage's own prompts
                cols.append(f"`{col}`" + (" (before training)" if col == f"{s.name}: {k}" else ""))
            cols = ", ".join(cols)
            out.append(f"- **{eval_label(f.name)}** (`{s.name}/{f.name}`, columns {cols})"
                       + (": " + "; ".join(bits) if bits else ""))
    for s in stages:
        if s.kind == "dpo" and s.rpo_alpha > 0:
            out.append(f"- `{s.name}`'s final train loss is its objective, the DPO loss + {s.rpo_alpha:g} × the "
                       f"chosen reply's NLL per token (RPO); its held-out loss is the DPO loss alone.")
    return ["Prompt sets and notes:", "", *out, ""] if out else []


def data_md(run_dir: Path, stages: list[Stage], speedrun: dict | None) -> list[str]:
    out = []
    corpus = _read_json(run_dir / "data" / "corpus" / "corpus_meta.json")
    if isinstance(corpus, dict) and "splits" in corpus:
        sp = corpus["splits"]
        out.append(f"- corpus: {fmt(corpus.get('documents'))} documents, {fmt(corpus.get('chars'))} characters "
                   f"(train {fmt(sp.get('train', {}).get('documents'))} / val {fmt(sp.get('val', {}).get('documents'))} "
                   f"documents)")
    dial = _read_json(run_dir / "data" / "chat" / "dialogues_meta.json")
    if isinstance(dial, dict) and isinstance(dial.get("families"), dict):
        fams = ", ".join(f"{k} {fmt(v.get('train'))}/{fmt(v.get('heldout'))}" for k, v in dial["families"].items()
                         if isinstance(v, dict))
        out.append(f"- dialogues (train/held-out per family): {fams}")
    for s in stages:
        stats = _read_json(s.path / "tokenizer_stats.json")
        if isinstance(stats, dict):
            out.append(f"- tokenizer `{s.name}`: {fmt(stats.get('vocab_size'))} tokens, "
                       f"{fmt(stats.get('val_bytes_per_token'))} bytes per token on val")
    return out


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write ``report.md`` and its PNG plots into ``out`` (default: ``run_dir``); returns the path
    of report.md."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    out_dir = Path(out) if out is not None else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = find_stages(run_dir)
    speedrun = _read_json(run_dir / "speedrun.json")
    speedrun = speedrun if isinstance(speedrun, dict) else None
    if not stages and speedrun is None:
        raise UserError(f"{run_dir}: nothing to report: no stage directories (with metrics.jsonl, "
                        f"train_summary.json or config.json) and no speedrun.json")
    t_start = time.time()
    table = collect_metrics(stages, speedrun)
    times = collect_time(stages, speedrun)

    for old in out_dir.glob("*.png"):  # plots of an earlier report that may no longer apply
        if old.name in ("loss.png", "reward_kl.png", "accuracy.png", "time.png") or old.name.startswith(("metrics_", "clip_")):
            old.unlink()
    plots: list[tuple[str, Path]] = []
    for title, p in (("Loss curves", plot_losses(stages, out_dir)),
                     ("Reward and KL (RL stages)", plot_rl(stages, out_dir)),
                     ("Accuracy per task family", plot_accuracy(table, out_dir))):
        if p is not None:
            plots.append((title, p))
    captions: dict[str, str] = {}
    clip_plots, clip_notes = plot_clip(stages, out_dir)
    plots += clip_plots
    if clip_notes:
        captions["clip"] = "Not drawn: " + "; ".join(clip_notes) + "."
    rl_notes = rl_keys(stages)[1]
    if rl_notes:
        captions["Reward and KL (RL stages)"] = "Not plotted: " + "; ".join(rl_notes) + "."
    for s in stages:
        done = {k for r in s.rows for k in r if k.endswith("loss") or k in RL_KEYS}
        p, notes = plot_other(s, out_dir, done)
        if p is not None:
            plots.append((f"Other logged metrics: {s.name}", p))
        if notes:
            captions[f"Other logged metrics: {s.name}"] = (
                f"Not plotted{f' for {s.name}' if p is None else ''}: " + "; ".join(notes) + ".")
    if speedrun and _is_num(speedrun.get("seconds")):
        # every second of the run in a row: what no stage recorded, and this report (written after
        # speedrun.json, measured up to here: the time plot and the markdown take well under a second)
        rest = speedrun["seconds"] - sum(r["seconds"] for r in times if _is_num(r.get("seconds")))
        if rest >= 0.5:
            times.append({"stage": "other (between stages)", "seconds": round(rest, 1)})
        times.append({"stage": "report", "seconds": round(time.time() - t_start, 1)})
    p = plot_time(times, out_dir)
    if p is not None:
        plots.insert(sum(1 for title, _ in plots if not title.startswith("Other")), ("Time per stage", p))

    md = [f"# chatsmith report: {run_dir.resolve().name}", ""]
    created = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    head = f"Run directory `{run_dir}`, report written {created}."
    if speedrun:
        head += (f" Speedrun: {fmt(speedrun.get('seconds', 0) / 60)} min of a "
                 f"{fmt(speedrun.get('minutes_budget'))}-minute budget.")
    md += [head, ""]
    chain = chain_md(speedrun)
    if chain:
        md += ["## The chain on a pretrained model", "", *chain]
    # the speedrun's rl/ stage, or an `rlhf --control-sft` output directory itself
    control = next((c for c in (rl_control_md(_read_json(d / "rl_eval.json")) for d in (run_dir / "rl", run_dir)) if c), [])
    if control:
        md += ["## RL against more SFT", "", *control]
    md += ["## Metrics by stage", ""]
    cols = [c for c in table.columns if any(c in cells for cells in table.cells.values())]
    if table.cells:
        md.append(md_table(["metric", *cols], [[m, *(fmt(cells.get(c)) for c in cols)]
                                               for m, cells in table.cells.items()]))
        md += ["", "Language-model losses are nats per token (a reward model's, per pair); bits-per-byte "
               "compares models with different tokenizers (and the n-gram baseline). Rows named after a "
               "prompt set come from the stages' before/after files (`*_eval.json`); one model measured on "
               "two prompt sets has two rows, one per set, never one row that disagrees with itself. Task "
               "rows come from `chatsmith eval` (`eval*/metrics.json`). A dash: the stage has no such "
               "metric.", ""]
        md += evals_md(stages)
    else:
        md += ["No metrics recorded yet.", ""]
    if times:
        md += ["## Time and tokens per stage", ""]
        md.append(md_table(["stage", "seconds", "steps", "tokens"],
                           [[r["stage"], fmt(r.get("seconds")), fmt(r.get("steps")), fmt(r.get("tokens"))]
                            for r in times]))
        total = sum(r["seconds"] for r in times if _is_num(r.get("seconds")))
        line = f"Total of the rows: {fmt(total)} s"
        if speedrun and _is_num(speedrun.get("seconds")):
            line += f" (the run until its report: {fmt(speedrun['seconds'])} s, then the report)"
        md += ["", line + ".", ""]
    if plots:
        md += ["## Plots", ""]
        for title, p in plots:
            rel = os.path.relpath(p, out_dir)
            md += [f"### {title}", "", f"![{title}]({rel})", ""]
            if title in captions:
                md += [captions.pop(title), ""]
    if captions:  # stages whose every other metric was constant or a single value
        md += [*captions.values(), ""]
    smp = samples_md(stages, speedrun)
    if smp:
        md += ["## Samples", "", *smp, ""]
    dat = data_md(run_dir, stages, speedrun)
    if dat:
        md += ["## Data", "", *dat, ""]
    notes = [f"- `{s.name}/metrics.jsonl`: {s.bad_rows} unreadable line(s) skipped" for s in stages if s.bad_rows]
    if notes:
        md += ["## Notes", "", *notes, ""]
    path = out_dir / "report.md"
    atomic.write_text(path, "\n".join(md).rstrip() + "\n")
    print(f"report written to {path} ({len(plots)} plots)", file=sys.stderr)
    return path


# --- the verb -------------------------------------------------------------------------------------

def _arguments(p):
    p.add_argument("run_dir", help="a speedrun directory, a folder of stage directories, or one model directory")
    p.add_argument("--out", default=None, help="folder for report.md and the plots (default: RUN_DIR)")


VERB = Verb("report", "report.md + PNG plots for a run directory (or one training output)", _arguments,
            lambda a: print(write_report(a.run_dir, a.out)))
