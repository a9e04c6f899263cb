"""Invalid and incomplete UTF-8 from a byte-level model: streaming holds an incomplete sequence back
until it completes (however long it waits), only a sequence that can no longer complete becomes
U+FFFD, and the streamed text equals the decode of the whole reply. The tokenizer's byte pieces
decode exactly as the tokenizer does, for chatsmith's tokenizer and an imported one."""

import codecs
import random

import pytest

from chatsmith.engine import Detokenizer, Engine, SamplingParams
from chatsmith.report import invalid_utf8
from chatsmith.tokenizer import Tokenizer
from test_engine_unit import BOS, END, EOS, ByteTokenizer, MockModel

# invalid bytes (lone continuation bytes) before a character whose first byte waits long enough
# for a decoder that gives up after 8 held tokens to release it as U+FFFD
GARBAGE_THEN_CHAR = bytes([0x80] * 7) + "你".encode() + b"ok " + bytes([0xE5, 0x41]) + "好".encode()


class BytePiecesTokenizer(ByteTokenizer):
    """The mock byte tokenizer, telling the engine its tokens' bytes (as a byte-level BPE does)."""

    def byte_pieces(self):
        return [bytes([i]) for i in range(256)] + [b"<|bos|>", b"", b""]


def rule_from(data: bytes):
    return lambda seq: data[len(seq) - 2] if len(seq) - 2 < len(data) else EOS


@pytest.mark.parametrize("tok", [BytePiecesTokenizer()], ids=["byte-pieces"])
def test_stream_holds_incomplete_sequences_and_matches_the_whole_decode(tok):
    engine = Engine(MockModel(rule_from(GARBAGE_THEN_CHAR)), tok, max_batch=2)
    chunks = [t for _, t in engine.stream(tok.encode("go"), SamplingParams(max_new_tokens=64, temperature=0))]
    want = GARBAGE_THEN_CHAR.decode("utf-8", errors="replace")
    assert want == "\ufffd" * 7 + "你ok \ufffdA好"
    assert "".join(chunks) == engine.last[0].text == want
    # U+FFFD only for the 8 bytes that could never complete, each where the whole decode has it
    assert sum(c.count("\ufffd") for c in chunks) == 8
    assert any("你" in c for c in chunks) and any("好" in c for c in chunks)


def test_a_reply_cut_inside_a_character_ends_with_one_replacement():
    tok = BytePiecesTokenizer()
    data = "ab你".encode()[:-1]  # the length limit falls inside 你
    engine = Engine(MockModel(rule_from(data + b"x")), tok, max_batch=1)
    chunks = [t for _, t in engine.stream(tok.encode("go"), SamplingParams(max_new_tokens=len(data), temperature=0))]
    # nothing of the unfinished character while it could still complete; at the end it cannot
    assert [c for c in chunks if c] == ["a", "b", "\ufffd"]
    assert "".join(chunks) == engine.last[0].text == "ab\ufffd"


def test_detokenizer_bytes_path_equals_decoding_everything():
    tok = BytePiecesTokenizer()
    rng = random.Random(0)
    ids = [rng.choice([0x41, 0x80, 0xE4, 0xBD, 0xA0, 0xF0, 0x9F, 0x98, 0x80, 0xC3, 0xA9]) for _ in range(3000)]
    d = Detokenizer(tok)
    out = "".join(d.push(t) for t in ids) + d.flush()
    assert out == bytes(ids).decode("utf-8", errors="replace")


def _real_tokenizers(tokenizer_dir, tmp_path):
    from test_interop import hf_tokenizer

    hf_tokenizer().save_pretrained(tmp_path / "hf")
    return [Tokenizer.load(tokenizer_dir), Tokenizer.load(tmp_path / "hf")]


def test_byte_pieces_decode_as_the_tokenizer_does(tokenizer_dir, tmp_path):
    """The engine's bytes path relies on it: for chatsmith's tokenizer and an imported byte-level BPE,
    the pieces joined and read as UTF-8 are tok.decode, special tokens and broken sequences included."""
    rng = random.Random(1)
    for tok in _real_tokenizers(tokenizer_dir, tmp_path):
        pieces = tok.byte_pieces()
        assert pieces is not None and len(pieces) == tok.vocab_size
        text = "Hello 你好, 床前明月光 😀 <|eos|> ok"
        ids = tok.encode(text, bos=True)
        for trial in range(30):
            seq = ids if trial == 0 else [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
            dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
            joined = "".join(dec.decode(pieces[t]) for t in seq) + dec.decode(b"", final=True)
            assert joined == tok.decode(seq), seq


def test_invalid_utf8_counts_sequences_the_model_emitted():
    assert invalid_utf8("床前明月光") == 0
    assert invalid_utf8("\ufffd流\ufffd萴德") == 2
