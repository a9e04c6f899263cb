"""lm-evaluation-harness against `chatsmith serve`: `chatsmith lm-eval-tasks` writes local YAML +
JSONL tasks, `lm_eval --model local-completions` runs them over HTTP, fully offline.

lm_eval is an optional, heavy dependency (requirements-eval.txt); without it these tests skip.
The task export itself is tested always."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from chatsmith.errors import UserError
from chatsmith.eval.harness import export_tasks
from conftest import REPO

HAVE_LM_EVAL = all(importlib.util.find_spec(m) for m in ("lm_eval", "tenacity"))
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm_eval is not installed: "
                                   "pip install -r requirements-eval.txt")

QA = [{"prompt": "What is 2 + 3?", "answers": ["5", "five"]}, {"prompt": "The king said", "answer": "to"},
      {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a sea."}],
       "answer": "red"}]
MC = [{"prompt": "The king said", "choices": ["to the queen", "ships"], "label": 0},
      {"prompt": "In the river there were", "choices": ["three", "love war"], "label": 1}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_export_writes_lm_eval_tasks_with_chatsmith_prompts(tmp_path):
    from chatsmith.eval.prompting import load_template

    qa, mc = write_jsonl(tmp_path / "qa.jsonl", QA), write_jsonl(tmp_path / "my-mc.jsonl", MC)
    out = export_tasks([str(qa), str(mc)], tmp_path / "lm")
    assert [w["name"] for w in out] == ["chatsmith_qa", "chatsmith_my_mc"]
    cfg = yaml.safe_load(Path(out[0]["yaml"]).read_text())
    assert cfg["task"] == "chatsmith_qa" and cfg["output_type"] == "generate_until"
    assert cfg["dataset_path"] == "json" and Path(cfg["dataset_kwargs"]["data_files"]["test"]).is_absolute()
    assert cfg["generation_kwargs"]["until"] == ["\n"] and cfg["doc_to_target"] == "answers"
    docs = [json.loads(ln) for ln in Path(out[0]["data"]).read_text().splitlines()]
    # the prompts are the plain zero-shot template, as `chatsmith eval --no-chat` renders them
    assert load_template("zero-shot").plain == "Question: {question}\nAnswer:"
    assert docs[0] == {"prompt": "Question: What is 2 + 3?\nAnswer:", "source": f"{qa}:1", "answers": ["5", "five"]}
    assert docs[2]["prompt"] == "System: Be terse.\nQuestion: Name a sea.\nAnswer:"
    cfg = yaml.safe_load(Path(out[1]["yaml"]).read_text())
    assert cfg["output_type"] == "multiple_choice" and cfg["doc_to_target"] == "label"
    assert json.loads(Path(out[1]["data"]).read_text().splitlines()[1])["label"] == 1
    with pytest.raises(UserError, match="no lm-eval counterpart"):
        export_tasks([f"lm:{qa}"], tmp_path / "x")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(base_model):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "chatsmith", "serve", str(base_model), "--port", str(port),
                             "--model-name", "micro", "--device", "cpu"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                pytest.fail("chatsmith serve exited early")
            time.sleep(0.5)
        else:
            pytest.fail("chatsmith serve did not come up")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_lm_eval(url, task, include, out, extra=""):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(out / "hf-cache")}
    args = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--tasks", task,
            "--include_path", str(include), "--output_path", str(out), "--log_samples",
            "--model_args", f"base_url={url}/v1/completions,model=micro,tokenizer_backend=remote,max_length=64{extra}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = [json.loads(ln) for f in out.rglob(f"samples_{task}_*.jsonl") for ln in f.read_text().splitlines()]
    return results["results"][task], sorted(samples, key=lambda s: s["doc_id"])


@pytest.mark.slow
@needs_lm_eval
def test_lm_eval_generation_task_against_chatsmith_serve(server, base_model, tmp_path):
    from chatsmith.checkpoint import load_model
    from chatsmith.engine import Engine, SamplingParams
    from chatsmith.tokenizer import Tokenizer

    qa = write_jsonl(tmp_path / "qa.jsonl", QA)
    (w,) = export_tasks([str(qa)], tmp_path / "tasks", max_gen_toks=8)
    res, samples = run_lm_eval(server, w["name"], tmp_path / "tasks", tmp_path, ",tokenized_requests=False")
    assert 0.0 <= res["exact_match,none"] <= 1.0 and len(samples) == len(QA)
    # what lm_eval got over HTTP is chatsmith's own greedy continuation of the same prompt
    tok = Tokenizer.load(base_model)
    engine = Engine(load_model(base_model), tok)
    for s in samples:
        prompt = s["doc"]["prompt"]
        want = engine.generate(tok.encode(prompt, bos=True),
                               SamplingParams(max_new_tokens=8, temperature=0, stop=["\n"]))[0].text
        assert s["arguments"]["gen_args_0"]["arg_0"] == prompt
        assert s["resps"][0][0] == want


@pytest.mark.slow
@needs_lm_eval
def test_lm_eval_multiple_choice_against_chatsmith_serve(server, base_model, tmp_path):
    import torch

    from chatsmith.checkpoint import load_model
    from chatsmith.tokenizer import Tokenizer

    probe = httpx.post(f"{server}/v1/completions", json={"model": "micro", "prompt": [5, 6, 7], "max_tokens": 1,
                                                         "echo": True, "logprobs": 1, "temperature": 0}, timeout=30)
    # lm-eval's loglikelihood requests need echo + logprobs on token-id prompts: one value per prompt
    # token (None for the first, which has no context) and one for the generated token
    assert probe.status_code == 200, probe.text
    lps = (probe.json()["choices"][0].get("logprobs") or {}).get("token_logprobs")
    assert lps and len(lps) == 4 and lps[0] is None and all(isinstance(v, float) for v in lps[1:]), lps
    mc = write_jsonl(tmp_path / "mc.jsonl", MC)
    (w,) = export_tasks([str(mc)], tmp_path / "tasks")
    res, samples = run_lm_eval(server, w["name"], tmp_path / "tasks", tmp_path)
    assert 0.0 <= res["acc,none"] <= 1.0 and len(samples) == len(MC)
    # each choice's log-likelihood equals the model's, on the tokens lm-eval sent (no BOS added)
    tok, model = Tokenizer.load(base_model), load_model(base_model)
    for s in samples:
        ctx = s["doc"]["prompt"]
        for choice, resp in zip(s["doc"]["choices"], s["resps"]):
            whole, c_ids = tok.encode(ctx + " " + choice), tok.encode(ctx)
            ids = whole
            with torch.no_grad():
                lp = model(torch.tensor([ids[:-1]])).float().log_softmax(-1)[0]
            want = sum(lp[i - 1, ids[i]].item() for i in range(len(c_ids), len(ids)))
            assert float(resp[0][0]) == pytest.approx(want, abs=1e-3)
