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
beside the lexicon, "lexicon" the lexicon alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from chatsmith.encoder_engine import EncoderEngine
from chatsmith.errors import UserError
from chatsmith.moderation.lexicon import CRISIS_REPLY, Lexicon, load_lexicon

OPENAI_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
                     "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
                     "violence/graphic")
CATEGORIES = OPENAI_CATEGORIES + ("offensive",)
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


def load_moderator(spec: str, device: str = "cpu", threshold: float = 0.5) -> Moderator:
    """'lexicon', or a classifier directory (the lexicon and the classifier together)."""
    lex = load_lexicon(packaged_ambiguous())
    if spec == "lexicon":
        return Moderator(lex, threshold=threshold)
    if not Path(spec).is_dir():
        raise UserError(f"--moderation takes 'lexicon' or a classifier directory (chatsmith classify train on "
                        f"data build --what moderation); {spec!r} is neither")
    return Moderator(lex, EncoderEngine.load(spec, device=device), threshold, name=Path(spec).resolve().name)


__all__ = ["Moderator", "Verdict", "load_moderator", "CATEGORIES", "OPENAI_CATEGORIES", "REFUSAL", "CRISIS_REPLY"]
