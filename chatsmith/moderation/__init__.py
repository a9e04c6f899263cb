"""Content moderation: a lexicon layer and a learned layer behind one interface (`Moderator`).

    Moderator.check(texts) -> [Verdict]     flagged, the categories, their scores, what was hit

Categories: OpenAI's moderation schema requires its thirteen categories (hate, harassment,
self-harm, sexual, violence and their sub-categories) in every result. The data here supports
only two judgements, so only those are ever set:
  * "offensive" (chatsmith's own key, beside OpenAI's): a lexicon hit or the learned classifier
    (offensive fortunes vs clean text) above its threshold;
  * "self-harm" and "self-harm/intent": a first-person crisis phrase (lexicon.CRISIS_EN / _ZH).
OpenAI's other categories are reported false with score 0.0: this moderator does not judge them,
and the README says so. `flagged` is true when any category is.

The learned layer is a sentence classifier trained with `chatsmith classify train` on
`data build --what moderation` (labels clean / offensive); `load_moderator(MODEL_DIR)` uses it
beside the lexicon, "lexicon" the lexicon alone. Its operating point is set on the data's *dev*
split by `calibrate` (`chatsmith moderate --calibrate`): the threshold on P(offensive) that
maximises dev F1 among those where the classifier adds at most the target share of the dev
split's ordinary text (corpus paragraphs, dialogue messages) to what the lexicon already flags.
The lexicon's own false positives are not the threshold's to trade: no threshold changes them
(on the built-in dev split the lexicon alone flags 1.6% of ordinary text, so a budget on the sum
had no solution at 1%), and calibration reports them beside the total. It is stored beside the
classifier (MODEL_DIR/moderation.json, with the input length it was calibrated at), and every
loader — `moderate`, `chat --moderation`, `serve --moderation DIR` — uses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from chatsmith.atomic import write_json
from chatsmith.encoder_engine import EncoderEngine
from chatsmith.errors import UserError
from chatsmith.moderation.lexicon import CRISIS_REPLY, Lexicon, load_lexicon

OPENAI_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
                     "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
                     "violence/graphic")
CATEGORIES = OPENAI_CATEGORIES + ("offensive",)
CALIBRATION = "moderation.json"  # beside the classifier: its calibrated threshold and input length
ORDINARY_SOURCES = ("corpus", "dialogues")  # the data builder's sources of ordinary (non-fortune) clean text
DEFAULT_THRESHOLD, DEFAULT_MAX_LEN = 0.5, 128  # an uncalibrated classifier
REFUSAL = ("I'm sorry, but I can't help with that: the message was flagged by this server's content filter. "
           "Could you rephrase it?")


def packaged_ambiguous() -> frozenset[str]:
    """Lexicon entries that are ordinary words in the built-in corpus's train split (see ambiguous.txt)."""
    text = resources.files("chatsmith.moderation").joinpath("ambiguous.txt").read_text(encoding="utf-8")
    return frozenset(w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#"))


@dataclass
class Verdict:
    flagged: bool
    scores: dict[str, float]
    categories: dict[str, bool]
    hits: list[str] = field(default_factory=list)
    crisis: bool = False

    def result(self) -> dict:
        """One entry of OpenAI's `results` list."""
        return {"flagged": self.flagged, "categories": dict(self.categories),
                "category_scores": dict(self.scores),
                "category_applied_input_types": {c: ["text"] for c in OPENAI_CATEGORIES}}


class Moderator:
    def __init__(self, lexicon: Lexicon, classifier: EncoderEngine | None = None, threshold: float = 0.5,
                 name: str = "chatsmith-moderation-lexicon"):
        self.lexicon, self.classifier, self.threshold, self.name = lexicon, classifier, threshold, name
        self.offensive_index = None
        if classifier is not None:
            labels = list(getattr(classifier.model.cfg, "labels", None) or [])
            if "offensive" not in labels:
                raise UserError(f"the moderation classifier's labels are {labels}; it needs an 'offensive' label "
                                f"(train it on chatsmith data build --what moderation)")
            self.offensive_index = labels.index("offensive")

    def check(self, texts: list[str], learned: bool = True) -> list[Verdict]:
        probs = None
        if self.classifier is not None and learned and texts:
            probs = self.classifier.classify(texts)[:, self.offensive_index].tolist()
        out = []
        for i, t in enumerate(texts):
            hits = self.lexicon.hits(t)
            crisis = self.lexicon.crisis(t)
            offensive = 1.0 if hits else 0.0
            if probs is not None:
                offensive = max(offensive, probs[i])
            scores = {c: 0.0 for c in CATEGORIES}
            scores["offensive"] = round(float(offensive), 6)
            if crisis:
                scores["self-harm"] = scores["self-harm/intent"] = 1.0
            cats = {c: False for c in CATEGORIES}
            cats["offensive"] = offensive >= self.threshold
            cats["self-harm"] = cats["self-harm/intent"] = crisis
            out.append(Verdict(any(cats.values()), scores, cats, hits, crisis))
        return out


def read_calibration(model_dir: str | Path) -> dict | None:
    """MODEL_DIR/moderation.json (None when the classifier was never calibrated)."""
    f = Path(model_dir) / CALIBRATION
    if not f.is_file():
        return None
    try:
        cal = json.loads(f.read_text(encoding="utf-8"))
        t, n = float(cal["threshold"]), int(cal["max_len"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{f}: not a moderation calibration ({e}); run chatsmith moderate --calibrate again") from None
    if not 0 < t <= 1 or n < 2:
        raise UserError(f"{f}: threshold {t} must be in (0, 1] and max_len {n} at least 2")
    return cal


def load_moderator(spec: str, device: str = "cpu", threshold: float | None = None,
                   max_len: int | None = None) -> Moderator:
    """'lexicon', or a classifier directory (the lexicon and the classifier together), at its
    calibrated threshold and input length unless `threshold` / `max_len` say otherwise."""
    lex = load_lexicon(packaged_ambiguous())
    if threshold is not None and not 0 < threshold <= 1:
        raise UserError(f"the moderation threshold must be in (0, 1], got {threshold}")
    if spec == "lexicon":
        return Moderator(lex, threshold=threshold or DEFAULT_THRESHOLD)
    if not Path(spec).is_dir():
        raise UserError(f"--moderation takes 'lexicon' or a classifier directory (chatsmith classify train on "
                        f"data build --what moderation); {spec!r} is neither")
    cal = read_calibration(spec) or {}
    threshold = threshold if threshold is not None else cal.get("threshold", DEFAULT_THRESHOLD)
    engine = EncoderEngine.load(spec, device=device, max_len=max_len or cal.get("max_len", DEFAULT_MAX_LEN))
    return Moderator(lex, engine, float(threshold), name=Path(spec).resolve().name)


def calibrate(mod: Moderator, records: list[dict], target_fpr: float = 0.01) -> dict:
    """The operating threshold of mod's classifier on labelled dev records ({text, label, source}):
    among thresholds t where the classifier (P(offensive) >= t) flags at most target_fpr of the
    ordinary clean texts (sources corpus / dialogues) that the lexicon lets through, the one with
    the best F1 of the lexicon-or-classifier verdict on all records. t = 1.0 (the classifier adds
    nothing) always qualifies, so there is always an answer. Returns the threshold and the dev
    metrics at it, the lexicon's own false-positive rate among them (nothing is written)."""
    if mod.classifier is None:
        raise UserError("calibration needs a classifier directory (--moderation MODEL_DIR), not the lexicon alone")
    if not 0 < target_fpr < 1:
        raise UserError(f"the target false-positive rate must be in (0, 1), got {target_fpr}")
    texts = [r["text"] for r in records]
    gold = torch.tensor([r["label"] == "offensive" for r in records])
    ordinary = torch.tensor([r["label"] != "offensive" and r.get("source") in ORDINARY_SOURCES for r in records])
    if not gold.any() or not ordinary.any():
        raise UserError("the dev records need offensive texts and ordinary clean ones (sources corpus/dialogues): "
                        "build them with chatsmith data build --what moderation")
    probs = mod.classifier.classify(texts)[:, mod.offensive_index].float()
    hit = torch.tensor([bool(mod.lexicon.hits(t)) for t in texts])
    cands = torch.cat([probs.unique(), torch.ones(1) + 1e-6])  # the last: the classifier never decides alone
    learned = probs[None] >= cands[:, None]  # (thresholds, records)
    pred = hit[None] | learned
    n_ord = ordinary.sum()
    added = (learned & ~hit & ordinary).sum(1) / n_ord  # what the threshold is responsible for
    fpr = (pred & ordinary).sum(1) / n_ord
    tp, fp = (pred & gold).sum(1).float(), (pred & ~gold).sum(1).float()
    prec, rec = tp / (tp + fp).clamp(min=1), tp / gold.sum()
    f1 = 2 * prec * rec / (prec + rec).clamp(min=1e-9)
    ok = added <= target_fpr
    i = int(torch.where(ok, f1, torch.full_like(f1, -1.0)).argmax())
    return {"threshold": min(float(cands[i]), 1.0), "target_fpr": target_fpr, "max_len": mod.classifier.max_len,
            "dev": {"records": len(records), "offensive": int(gold.sum()), "ordinary": int(n_ord),
                    "fpr_ordinary": float(fpr[i]), "fpr_ordinary_added": float(added[i]),
                    "fpr_ordinary_lexicon": float((hit & ordinary).sum() / n_ord),
                    "precision": float(prec[i]), "recall": float(rec[i]),
                    "f1": float(f1[i]), "fpr_clean": float((pred[i] & ~gold).sum() / (~gold).sum())}}


def save_calibration(model_dir: str | Path, cal: dict):
    write_json(Path(model_dir) / CALIBRATION, cal)


__all__ = ["Moderator", "Verdict", "load_moderator", "calibrate", "save_calibration", "read_calibration", "CATEGORIES", "OPENAI_CATEGORIES", "REFUSAL", "CRISIS_REPLY"]
