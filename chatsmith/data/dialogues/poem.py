"""poem: fortunes-zh 唐诗三百首 / 宋诗一百首, "背诵李白的《静夜思》" -> the poem."""

from __future__ import annotations

import re
from pathlib import Path

from chatsmith.data.dialogues.base import Family, Inputs, record, seeded_rng
from chatsmith.data.sources import _ANSI, read_text_file, split_fortunes, warn

_POEM_FILES = (("tang300", "唐诗", "唐", "Tang"), ("song100", "宋诗", "宋", "Song"))


def parse_poem(entry: str) -> tuple[str, str, str] | None:
    """(title, author, body) of a fortunes-zh poem entry: a title line with 《...》 (and
    maybe a "题目:" prefix), an author line "作者：NAME" (maybe with dates), then the poem.
    ANSI colour codes are removed; None when the layout is not that."""
    text = _ANSI.sub("", entry).replace("\x1b", "").replace("\u00a0", " ")
    lines = [ln.strip() for ln in text.replace("\r", "").split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    if len(lines) < 3:
        return None
    m = re.search(r"《(.+)》", lines[0])
    a = re.match(r"作者\s*[:：]\s*(.+)", lines[1])
    if not m or not a:
        return None
    title = m.group(1).strip()
    author = re.sub(r"[（(].*?[)）]", "", a.group(1)).strip()
    body_lines: list[str] = []
    for ln in lines[2:]:
        if ln or (body_lines and body_lines[-1]):
            body_lines.append(ln)
    body = "\n".join(body_lines).strip()
    if not title or not author or not body:
        return None
    return title, author, body


_POEM_PROMPTS = ("请写一首{kind}《{title}》。", "背诵{author}的《{title}》。",
                 "{author}的《{title}》是怎么写的？", "我想读{author}的《{title}》，你能写出来吗？",
                 "请默写{author}的{kind}《{title}》。", "Please recite the {en} poem 《{title}》 by {author}.")


def read_poems(fortunes_dir: Path, seed: int, per_poem: int = 2) -> tuple[list[dict], dict]:
    out, stats = [], {"poems": 0, "unparsed": 0}
    rng = seeded_rng("poem", seed)
    for fname, kind, dynasty, en in _POEM_FILES:
        path = fortunes_dir / fname
        if not path.is_file():
            warn(f"{path} not found (apt-get install fortunes-zh); no {kind}")
            continue
        poems = []
        for entry in split_fortunes(read_text_file(path)):
            p = parse_poem(entry)
            if p is None:
                stats["unparsed"] += 1
            else:
                poems.append(p)
        title_count: dict[str, int] = {}
        for t, _, _ in poems:
            title_count[t] = title_count.get(t, 0) + 1
        for idx, (title, author, body) in enumerate(poems):
            stats["poems"] += 1
            reply = f"《{title}》\n{dynasty}·{author}\n\n{body}"
            templates = list(_POEM_PROMPTS)
            if title_count[title] > 1:  # "请写一首唐诗《送别》" would have two right answers
                templates[0] = "请写一首{author}的{kind}《{title}》。"
            for tpl in rng.sample(templates, min(per_poem, len(templates))):
                prompt = tpl.format(kind=kind, title=title, author=author, en=en)
                out.append(record("poem", [prompt, reply], f"fortunes-zh/{fname}",
                                  key=f"poem:{fname}:{idx}"))
    return out, stats


class Poem(Family):
    name, default_cap = "poem", 1000

    def missing(self, inputs: Inputs) -> str | None:
        if not any((inputs.fortunes_dir / f[0]).is_file() for f in _POEM_FILES):
            return f"{inputs.fortunes_dir}/tang300 not found (apt-get install fortunes-zh)"
        return None

    def records(self, inputs: Inputs, cap: int | None) -> tuple[list[dict], dict]:
        return read_poems(inputs.fortunes_dir, inputs.seed, inputs.poems_per_item)
