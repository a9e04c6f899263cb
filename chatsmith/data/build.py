"""`chatsmith data build`: the built-in corpus, dialogues and preference pairs, or your own text.

    chatsmith data build --out data                 data/corpus (pretraining text) + data/chat
                                                    (dialogues, preference pairs)
    chatsmith data build --input notes/ --out mine  your own .txt/.md/.jsonl as a cleaned corpus
    chatsmith data build --what sentiment           data/sentiment/{en,zh,en-reviews}/{train,test}.jsonl
    chatsmith data build --what qa                  data/qa/{train,test}.json (SQuAD v2.0)
    chatsmith data build --what images              data/images/{fashion,emoji}/ (image-text pairs, CLIP)
    chatsmith data build --what translation         data/translation/{train,test}.jsonl (zh–en pairs)
    chatsmith data build --what moderation          data/moderation/{train,dev,test}.jsonl (offensive / clean)

`--what all` builds the corpus and the chat data; the encoder sets (sentiment, qa) are built
only when asked for, since the corpus and chat stages never read them.
"""

from __future__ import annotations

from pathlib import Path

from chatsmith.data.corpus import build_corpus
from chatsmith.data.dialogues import FAMILIES, build_dialogues
from chatsmith.data.images import build_images
from chatsmith.data.moderation import build_moderation
from chatsmith.data.preferences import build_preferences
from chatsmith.data.qa import build_qa
from chatsmith.data.sentiment import build_sentiment
from chatsmith.data.sources import default_sources_dir
from chatsmith.data.translation import build_translation
from chatsmith.errors import UserError
from chatsmith.flags import Verb


def add_arguments(p):
    p.add_argument("--out", default="data", help="output directory: built-in data goes to OUT/corpus "
                   "(pretraining text) and OUT/chat (dialogues); with --input the corpus goes to OUT itself")
    p.add_argument("--what", choices=["all", "corpus", "chat", "sentiment", "qa", "images", "translation",
                                      "moderation"],
                   default="all",
                   help="which built-in data to build: all = corpus + chat; sentiment and qa (classification and "
                   "extractive QA sets for encoders, with fixed held-out splits) go to OUT/sentiment and OUT/qa; "
                   "images (Fashion-MNIST + emoji with English and Chinese captions, for `chatsmith clip train`) "
                   "to OUT/images; translation (zh-en pairs from LibreOffice's help and UI strings and the Bible, "
                   "held out by document) to OUT/translation")
    p.add_argument("--input", nargs="+", help="your own .txt/.md/.jsonl files or folders instead of the built-in sources")
    p.add_argument("--sources-dir", default=default_sources_dir(),
                   help="where scripts/setup.sh put the raw source packages "
                        "($CHATSMITH_SOURCES; else ./.sources, else the checkout's)")
    p.add_argument("--dialogues", default=None, help="--what moderation: dialogues whose messages are clean text too "
                   "(default: OUT/chat/train.jsonl when it exists; 'none': no dialogues)")
    p.add_argument("--corpus", default=None, help="--what moderation: the built corpus whose train split gives "
                   "clean text (default: OUT/corpus)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of corpus documents held out for validation")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val and held-out splits")
    p.add_argument("--max-doc-chars", type=int, default=20000, help="longer documents are cut at paragraphs")
    p.add_argument("--families", nargs="+", help=f"dialogue families to build (default: all but the *_tools "
                                                 f"forms; all: {', '.join(FAMILIES)})")
    p.add_argument("--heldout-per-family", type=int, default=100, help="held-out dialogues per family")


def main(a):
    if not 0 <= a.val_fraction < 1:
        raise UserError("--val-fraction must be in [0, 1)")
    unknown = [f for f in a.families or [] if f not in FAMILIES]
    if unknown:  # before anything is built: a typo must not cost a corpus build first
        raise UserError(f"--families: unknown dialogue family {', '.join(map(repr, unknown))}; "
                        f"choose from {', '.join(FAMILIES)}")
    if a.input:
        build_corpus(a.out, inputs=a.input, sources_dir=a.sources_dir, val_fraction=a.val_fraction,
                     seed=a.seed, max_doc_chars=a.max_doc_chars)
        print(f"corpus written to {a.out}")
        return
    out = Path(a.out)
    if a.what == "sentiment":
        meta = build_sentiment(out, sources_dir=a.sources_dir)
        sets = ", ".join(f"{k} {v['train']['total']}/{v['test']['total']}" for k, v in meta["sets"].items())
        print(f"sentiment sets (train/test: {sets}) written to {out / 'sentiment'}")
        return
    if a.what == "moderation":
        dialogues = out / "chat" / "train.jsonl" if a.dialogues is None else Path(a.dialogues)
        if a.dialogues == "none" or (a.dialogues is None and not dialogues.is_file()):
            dialogues = None
        meta = build_moderation(out, Path(a.corpus) if a.corpus else out / "corpus", dialogues=dialogues)
        print(f"moderation set (train {sum(meta['counts']['train'].values())}, test "
              f"{sum(meta['counts']['test'].values())}: {meta['counts']['test']}) written to {out / 'moderation'}")
        return
    if a.what == "qa":
        meta = build_qa(out, sources_dir=a.sources_dir)
        print(f"QA set ({meta['train']['questions']} train, {meta['test']['questions']} held-out questions, "
              f"SQuAD v2.0) written to {out / 'qa'}")
        return
    if a.what == "images":
        meta = build_images(out, sources_dir=a.sources_dir)
        sets = ", ".join(f"{k} {v['counts']}" for k, v in meta.items())
        print(f"image-text sets ({sets}) written to {out / 'images'}")
    if a.what == "translation":
        meta = build_translation(out, sources_dir=a.sources_dir)
        per = ", ".join(f"{k} {v['train']}/{v['test']}" for k, v in meta["sources"].items())
        print(f"translation pairs (train/held-out: {per}) written to {out / 'translation'}")
        return
    if a.what in ("all", "corpus"):
        build_corpus(out / "corpus", sources_dir=a.sources_dir, val_fraction=a.val_fraction, seed=a.seed,
                     max_doc_chars=a.max_doc_chars)
        print(f"corpus written to {out / 'corpus'}")
    if a.what in ("all", "chat"):
        build_dialogues(out / "chat", sources_dir=a.sources_dir, seed=a.seed,
                        heldout_per_family=a.heldout_per_family, families=a.families)
        counts = build_preferences(out / "chat", seed=a.seed)
        print(f"dialogues and preference pairs ({counts['train']['pairs']} train, "
              f"{counts['heldout']['pairs']} held-out) written to {out / 'chat'}")


VERB = Verb("data build", "the built-in corpus and dialogues, or your own text as a cleaned corpus",
            add_arguments, main)
