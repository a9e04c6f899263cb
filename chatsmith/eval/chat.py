"""Held-out chat metrics: assistant-token loss, how often replies end on their own, and exact-match
accuracy per checkable task family (arithmetic, quiz, …), all on conversations never trained on."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from chatsmith.batching import collate
from chatsmith.data.tasks import check_answer
from chatsmith.engine import Engine, SamplingParams
from chatsmith.tokenizer import encode_records


@torch.no_grad()
def assistant_loss(model, examples, pad_id: int, batch_size: int = 16) -> float:
    """Mean cross-entropy (nats) over assistant tokens, summed over examples, not averaged per batch."""
    device = next(model.parameters()).device
    total = count = 0.0
    for i in range(0, len(examples), batch_size):
        ex = examples[i:i + batch_size]
        b = collate([ids for ids, _ in ex], pad_id, masks=[m for _, m in ex])
        logits = model(b["x"].to(device)).float()
        y = b["y"].masked_fill(b["mask"] == 0, -100).to(device)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                                               reduction="sum")
        total += ce.item()
        count += (y != -100).sum().item()
    return total / max(count, 1)


@torch.no_grad()
def chat_metrics(model, tok, records, per_family: int = 20, max_new_tokens: int = 48, pad_id: int = 0,
                 n_samples: int = 3) -> dict:
    was_training = model.training
    model.eval()
    examples, _ = encode_records(tok, records, model.cfg.max_seq_len)
    res = {"assistant_loss": assistant_loss(model, examples, pad_id)}
    by_family = defaultdict(list)
    for r in records:
        fam = r.meta.get("family", "all")
        if len(by_family[fam]) < per_family:
            by_family[fam].append(r)
    engine = Engine(model, tok)
    prompts, refs, params = [], [], []
    for fam, recs in sorted(by_family.items()):
        for r in recs:
            ids, _ = tok.render_chat(r.messages[:-1], add_generation_prompt=True)
            if len(ids) < model.cfg.max_seq_len:
                # "ends on its own" means within twice the reference reply (at least max_new_tokens):
                # a fixed 40 tokens could never see a poem end, whose references are ~90 tokens
                ref = len(tok.encode(r.messages[-1]["content"]))
                budget = min(max(max_new_tokens, 2 * ref), model.cfg.max_seq_len - len(ids))
                prompts.append(ids)
                refs.append((fam, r))
                params.append(SamplingParams(max_new_tokens=budget, temperature=0))
    outs = engine.generate_many(prompts, params)
    correct, total, samples = defaultdict(int), defaultdict(int), []
    ended, seen = defaultdict(int), defaultdict(int)  # per family
    for (fam, r), c in zip(refs, outs):
        ended[fam] += c.finish_reason == "stop"
        seen[fam] += 1
        if r.meta.get("answers"):
            total[fam] += 1
            correct[fam] += check_answer(fam, c.text, r.meta["answers"])
        if len(samples) < n_samples * len(by_family) and sum(s["family"] == fam for s in samples) < n_samples:
            samples.append({"family": fam, "prompt": r.messages[-2]["content"], "reply": c.text,
                            "reference": r.messages[-1]["content"]})
    res["ended_share"] = sum(ended.values()) / max(len(outs), 1)
    res["ended_by_family"] = {f: ended[f] / seen[f] for f in sorted(seen)}
    res["exact_match"] = {f: correct[f] / total[f] for f in sorted(total)}
    res["generated"] = len(outs)
    # "ended" means within max(this, twice the reference reply's tokens): the report states it
    res["max_new_tokens"] = max_new_tokens
    res["samples"] = samples
    model.train(was_training)
    return res
