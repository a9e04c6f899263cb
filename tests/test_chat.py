"""`chatsmith chat` driven as a user would: piped input, and a pseudo-terminal session."""

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from conftest import REPO, cli

FACTS = [("What is the capital of France?", "Paris"), ("What is two plus two?", "four")]


@pytest.fixture(scope="module")
def chat_model(base_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    data = d / "facts.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in FACTS))
    out = d / "model"
    assert cli("sft", "--data", data, "--init", base_model, "--out", out, "--max-steps", 150, "--batch-size", 4,
               "--lr", "3e-3", "--warmup-steps", 5, "--log-every", 50) == 0
    return out


def test_piped_input_prints_one_reply_per_line_and_exits(chat_model):
    r = subprocess.run([sys.executable, "-m", "chatsmith", "chat", str(chat_model), "--temperature", "0"],
                       input="What is the capital of France?\n", capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Paris"


def test_piped_jsonl_pairs_every_reply_with_its_line(chat_model):
    lines = ["What is the capital of France?", "", "What is two plus two?"]
    r = subprocess.run([sys.executable, "-m", "chatsmith", "chat", str(chat_model), "--temperature", "0", "--jsonl"],
                       input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["user"] for x in rows] == [FACTS[0][0], FACTS[1][0]]  # the blank line is skipped
    assert rows[0]["assistant"] == "Paris" and rows[0]["turns_dropped"] == 0


class Terminal:
    def __init__(self, args):
        self.master, slave = pty.openpty()
        self.p = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, close_fds=True,
                                  env={**os.environ, "TERM": "dumb"})
        os.close(slave)
        self.buf = ""

    def expect(self, text, timeout=60):
        end = time.time() + timeout
        while text not in self.buf:
            if time.time() > end:
                raise AssertionError(f"timed out waiting for {text!r}; screen so far:\n{self.buf}")
            r, _, _ = select.select([self.master], [], [], 0.1)
            if r:
                try:
                    self.buf += os.read(self.master, 4096).decode(errors="replace")
                except OSError:
                    break
        i = self.buf.index(text) + len(text)
        seen, self.buf = self.buf[:i], self.buf[i:]
        return seen

    def send(self, line):
        os.write(self.master, (line + "\n").encode())


def test_terminal_session_with_commands(chat_model, tmp_path):
    t = Terminal([sys.executable, "-m", "chatsmith", "chat", str(chat_model), "--temperature", "0"])
    t.expect("you> ")
    t.send("/help")
    assert "/reset" in t.expect("you> ")
    t.send("What is two plus two?")
    assert "bot> four" in t.expect("you> ")
    t.send("/temp abc")
    assert "usage: /temp" in t.expect("you> ")
    t.send("/system Be terse.")
    assert "system prompt set" in t.expect("you> ")
    t.send("What is the capital of France?")
    t.expect("you> ")
    saved = tmp_path / "conv.json"
    t.send(f"/save {saved}")
    t.expect("you> ")
    msgs = json.loads(saved.read_text())
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[0]["content"] == "Be terse." and msgs[1]["content"] == "What is the capital of France?"
    t.send("/reset")
    assert "new conversation" in t.expect("you> ")
    t.send(f"/save {saved}")
    t.expect("you> ")
    assert json.loads(saved.read_text()) == [{"role": "system", "content": "Be terse."}]
    t.send("quit")
    assert t.p.wait(timeout=30) == 0


def test_context_overflow_drops_oldest_turns(chat_model):
    from chatsmith.chat import ChatSession
    from chatsmith.checkpoint import load_model
    from chatsmith.engine import Engine, SamplingParams
    from chatsmith.tokenizer import Tokenizer

    engine = Engine(load_model(chat_model), Tokenizer.load(chat_model))
    s = ChatSession(engine, SamplingParams(max_new_tokens=8, temperature=0))
    dropped_total = 0
    for i in range(12):
        _, dropped, _ = s.reply(f"turn {i}: What is two plus two?")
        dropped_total += dropped
    assert dropped_total > 0
    ids, _ = s.prompt_ids()
    assert len(ids) + 8 <= engine.model.cfg.max_seq_len
    assert s.history[-2]["content"] == "turn 11: What is two plus two?"
