"""Held-out chat metrics: assistant-token loss, how often replies end on their own, and exact-match
accuracy per checkable task family (arithmetic, quiz, …), all on conversations never trained on."""

from __future__ import annotations

from collections import defaultdict

import torch

from chatsmith.engine import Engine, SamplingParams


@torch.no_grad()
def chat_metrics(model, tok, records, per_family: int = 20, max_new_tokens: int = 48, pad_id: int = 0,
                 n_samples: int = 3) -> dict:
    from chatsmith.data.tasks import check_answer
    from chatsmith.train.sft import assistant_loss, encode_records

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
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    prompts, refs = [], []
    for fam, recs in sorted(by_family.items()):
        for r in recs:
            ids, _ = tok.render_chat(r.messages[:-1], add_generation_prompt=True)
            if len(ids) < model.cfg.max_seq_len:
                prompts.append(ids)
                refs.append((fam, r))
    outs = engine.generate_many(prompts, params)
    ended, correct, total, samples = 0, defaultdict(int), defaultdict(int), []
    for (fam, r), c in zip(refs, outs):
        ended += c.finish_reason == "stop"
        if r.meta.get("answers"):
            total[fam] += 1
            correct[fam] += check_answer(fam, c.text, r.meta["answers"])
        if len(samples) < n_samples * len(by_family) and sum(s["family"] == fam for s in samples) < n_samples:
            samples.append({"family": fam, "prompt": r.messages[-2]["content"], "reply": c.text,
                            "reference": r.messages[-1]["content"]})
    res["ended_share"] = ended / max(len(outs), 1)
    res["exact_match"] = {f: correct[f] / total[f] for f in sorted(total)}
    res["generated"] = len(outs)
    res["samples"] = samples
    model.train(was_training)
    return res
