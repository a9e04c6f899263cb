"""The built-in supervised fine-tuning (chat) dataset.

``build_dialogues`` assembles conversations from sources that ``scripts/setup.sh`` installs
through package managers, plus the project's own generators, and writes::

    OUT/train.jsonl          one conversation per line
    OUT/heldout.jsonl        conversations never trained on (evaluation)
    OUT/dialogues_meta.json  counts per family and split, what was built, held-out prompt hashes

Each line is OpenAI/TRL messages plus metadata::

    {"messages": [{"role": "user", "content": "What is 37 + 48?"},
                  {"role": "assistant", "content": "37 + 48 = 85. The answer is 85."}],
     "family": "arithmetic", "source": "tasks/arithmetic", "answers": ["85"]}

``answers`` (accepted alternatives, graded by :func:`chatsmith.data.tasks.check_answer`) is
present only for checkable families. Families:

=============  ==================================================================================
chatterbot     English and Chinese YAML conversations from the ``chatterbot-corpus`` wheel
quiz           bsdgames ``quiz`` files: capitals, elements, presidents, Latin, ... (checkable)
definition     WordNet: "What does 'X' mean?" -> the gloss and an example sentence
arithmetic     :mod:`chatsmith.data.tasks`, reply = the worked answer (checkable)
word_problem   :mod:`chatsmith.data.tasks`, reply = the worked answer (checkable)
number_sense   :mod:`chatsmith.data.tasks`: larger/smaller of two numbers, the number after/before (checkable)
identity       hand-written: the assistant is chatsmith (English and Chinese)
poem           fortunes-zh 唐诗三百首 / 宋诗一百首: "背诵李白的《静夜思》" -> the poem
=============  ==================================================================================

The held-out split is chosen per family with a fixed seed and is disjoint from train by
*prompt hash* (:func:`prompt_hash`: SHA-256 of the normalised user turns): records that share a
prompt, or that share an underlying problem (two phrasings of one arithmetic question, two
requests for one poem), are linked and always land on the same side. The held-out hashes are
listed in the meta file so later code can verify the split.

One module per family (a :class:`~chatsmith.data.dialogues.base.Family`), registered in
``families.py``; the split is in ``split.py`` and the build in ``build.py``. Build with
``chatsmith data build`` (the dialogues go to ``OUT/chat``).
"""

from __future__ import annotations

from chatsmith.data.dialogues.base import Family, Inputs, record, sample_in_order, seeded_rng
from chatsmith.data.dialogues.build import build_dialogues
from chatsmith.data.dialogues.chatterbot import (CHATTERBOT_WHEEL_GLOB, find_chatterbot_wheel,
                                                 read_chatterbot)
from chatsmith.data.dialogues.definition import WORDNET_DIR, read_definitions
from chatsmith.data.dialogues.families import CHECKABLE, DEFAULT_CAPS, FAMILIES, REGISTRY
from chatsmith.data.dialogues.generated import read_tasks
from chatsmith.data.dialogues.identity import IDENTITY_FILE, identity_prompts, read_identity
from chatsmith.data.dialogues.poem import parse_poem, read_poems
from chatsmith.data.dialogues.quiz import QUIZ_DIR, QUIZ_TEMPLATES, Q, read_quiz
from chatsmith.data.dialogues.quiz_syntax import (QuizSyntaxError, expand_quiz_answer,
                                                  quiz_alternatives, quiz_canonical,
                                                  read_quiz_index, read_quiz_lines,
                                                  split_quiz_line)
from chatsmith.data.dialogues.split import prompt_hash, split_records
from chatsmith.data.sources import FORTUNES_DIR, split_fortunes

__all__ = [
    "build_dialogues", "prompt_hash", "split_records",
    "FAMILIES", "CHECKABLE", "DEFAULT_CAPS", "REGISTRY", "Family", "Inputs",
    "record", "seeded_rng", "sample_in_order",
    "QUIZ_DIR", "WORDNET_DIR", "FORTUNES_DIR", "CHATTERBOT_WHEEL_GLOB", "IDENTITY_FILE",
    "find_chatterbot_wheel", "read_chatterbot", "read_definitions", "read_tasks",
    "identity_prompts", "read_identity", "parse_poem", "read_poems", "split_fortunes",
    "Q", "QUIZ_TEMPLATES", "read_quiz", "QuizSyntaxError", "expand_quiz_answer",
    "quiz_alternatives", "quiz_canonical", "read_quiz_index", "read_quiz_lines", "split_quiz_line",
]
