"""bench/performance.py's table: each ratio is chatsmith's row over its peer's from the same run."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "performance.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_performance", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def decode_result(**tok_s):
    return {"new_tokens": 128, "threads": 1, "rows": {k: {"decode_tok_s": v} for k, v in tok_s.items()}}


def test_decode_row_compares_fp32_with_fp32_peers_and_int8_with_all():
    res = {"decode-smollm2": decode_result(**{
        "chatsmith Engine": 30.0, "chatsmith Engine, int8": 90.0, "chatsmith Engine, bf16": 20.0,
        "transformers generate": 15.0, "llama.cpp f32": 60.0, "llama.cpp q8_0": 120.0,
        "llama.cpp, shipped SmolLM2-135M-Instruct.Q4_1.gguf": 100.0})}
    (row,) = load().table(res)[2:]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "decode, SmolLM2-135M, batch 1, 128 tokens, 1 thread"
    assert "llama.cpp Q4_1 (shipped) 100.0" in cells[1] and "bf16" not in cells[1]
    fp32, int8 = cells[3].split("; ")
    assert fp32 == "fp32: 2.00x transformers, 0.50x llama.cpp f32"  # not against q8_0 / Q4_1
    assert int8 == ("int8: 6.00x transformers, 1.50x llama.cpp f32, 0.75x llama.cpp q8_0, "
                    "0.90x llama.cpp Q4_1 (shipped)")


def test_serve_rows_give_the_clients_ratio_and_memory():
    lv = [{"clients": 1, "tok_s": 20.0, "ttft_p50_ms": 100, "ttft_p95_ms": 110},
          {"clients": 32, "tok_s": 140.0, "ttft_p50_ms": 3000, "ttft_p95_ms": 3500}]
    res = {"serve-smollm2": {"levels": lv, "rss_mb": {"idle_loaded": 900, "peak_levels": 1400, "idle_after": 1100}}}
    rows = load().table(res)[2:]
    assert rows[0].endswith("| 7.0x of one client |") and "32 clients 140.0 tok/s" in rows[0]
    assert "900 MB idle -> 1400 MB peak (32 chats) -> 1100 MB" in rows[1]
    assert load().table({})[2:] == []  # rows that did not run are left out, not printed empty
