"""bench.offline on the tiny exported model: the JSON's fields and sane numbers (nothing timed is asserted)."""

import json

import pytest

from bench import offline


def test_offline_bench_on_tiny_program(tiny_program, tmp_path, capsys):
    out = tmp_path / "offline.json"
    assert (
        offline.main(
            [
                "--program",
                str(tiny_program),
                "--prefill-lens",
                "16,40",
                "--prefill-chunk",
                "16",
                "--decode-batches",
                "1,4",
                "--decode-steps",
                "4",
                "--decode-prompt-len",
                "8",
                "--repeats",
                "2",
                "--membw-mib",
                "32",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| metric" in printed and "ours f32" in printed and "llama.cpp" not in printed
    assert "machine:" in printed and "command: python -m bench.offline --program" in printed

    r = json.loads(out.read_text())
    assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"] and r["machine"]["iree"]
    bw = r["memory_bandwidth"]
    assert bw["read_gb_s"] > 0 and bw["method"] in bw["methods_gb_s"]
    assert [run["engine"] for run in r["runs"]] == ["aotllm"]
    run = r["runs"][0]
    assert run["dtype"] == "float32" and run["weight_bytes"] > 0
    assert [p["tokens"] for p in run["prefill"]] == [16, 40]  # 40: calls of 16, 16 and 8 tokens
    assert [d["batch"] for d in run["decode"]] == [1, 4]
    for fig in run["prefill"] + run["decode"]:
        assert fig["tok_s"] > 0 and len(fig["repeats_s"]) == 2
    assert all(d["ms_per_step"] > 0 and d["steps"] == 4 for d in run["decode"])
    assert run["gb_s_achieved"] == pytest.approx(run["weight_bytes"] * run["decode"][0]["tok_s"] / 1e9)
    assert run["roofline_ratio"] == pytest.approx(run["gb_s_achieved"] / bw["read_gb_s"])
    assert run["roofline_tok_s"] > 0

    metrics = [row["metric"] for row in r["table"]]
    assert "prefill 16 tokens (tok/s)" in metrics and "decode batch 4 (tok/s)" in metrics
    assert all(set(row) == {"metric", "ours f32"} for row in r["table"])  # no llama.cpp column without the flag


def test_ratio_columns_pair_engines_by_dtype():
    plan = offline.Plan([16], [1], 8, 4, 1, 0)
    ours = offline.EngineRun(
        "aotllm", "float16", 100, [offline.Timing("prefill", 16, 0.5, 16), offline.Timing("decode", 1, 1.0, 4, 4)]
    )
    theirs = offline.EngineRun(
        "llama.cpp", "float16", 100, [offline.Timing("prefill", 16, 0.25, 16), offline.Timing("decode", 1, 2.0, 4, 4)]
    )
    rows, columns = offline.table_rows([ours, theirs], plan, bandwidth_gb_s=1.0)
    assert [h for _, h in columns] == ["metric", "ours f16", "llama.cpp f16", "ours/llama.cpp f16"]
    by = {row["metric"]: row for row in rows}
    assert by["prefill 16 tokens (tok/s)"]["x0"] == pytest.approx(0.5)
    assert by["decode batch 1 (tok/s)"]["x0"] == pytest.approx(2.0)
    assert by["decode batch 1 (ms/step)"]["x0"] is None  # ratios only for throughput rows


def test_weight_bytes_leave_out_an_untied_embedding_table():
    assert offline.weight_bytes_read({"token_embd.weight": 10, "output.weight": 10, "blk.0.x": 5}) == 15
    assert offline.weight_bytes_read({"token_embd.weight": 10, "blk.0.x": 5}) == 15  # tied: read as lm_head
