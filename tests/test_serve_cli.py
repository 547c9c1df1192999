"""python -m serve's command line: --config files, shortfin spellings, clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from serve.flags import parse_args
from tests.server_util import free_port, wait_healthy
from tests.tiny import char_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_config_files_parse():
    a = parse_args(["--config", str(ROOT / "configs/smollm2-cpu.json")])
    assert a.vmfb is None and a.max_running == 16 and a.kv_pages == 512 and a.prefix_caching
    b = parse_args(["--config", str(ROOT / "configs/llama-3.1-8b-hip.json"), "--port", "9000"])
    assert b.device == "hip" and b.port == 9000 and b.max_running == 32
    assert b.parameters == [Path("out/llama-3.1-8b/model.irpa")] and b.vmfb.name == "model_hip.vmfb"
    c = parse_args(["--config", str(ROOT / "configs/llama-3.1-8b-cuda.json")])
    assert c.device == "cuda" and c.vmfb.name == "model_cuda.vmfb"


def test_shortfin_spellings():
    a = parse_args(
        [
            "--vmfb",
            "m.vmfb",
            "--parameters",
            "a.irpa",
            "b.irpa",
            "--model_config",
            "c.json",
            "--tokenizer_json",
            "t.json",
            "--device_ids",
            "0",
            "1",
        ]
    )
    assert a.model_config == Path("c.json") and a.tokenizer == Path("t.json") and a.device_ids == [0, 1]
    assert a.parameters == [Path("a.irpa"), Path("b.irpa")]


def test_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--vmfb", "m.vmfb"])
    assert "together" in capsys.readouterr().err
    bad = tmp_path / "c.json"
    bad.write_text('{"not_a_flag": 1}')
    with pytest.raises(SystemExit):
        parse_args(["--config", str(bad)])
    assert "unknown key 'not_a_flag'" in capsys.readouterr().err


def test_chat_template_flag(capsys):
    assert parse_args(["--chat-template", "llama3"]).chat_template == "llama3"
    with pytest.raises(SystemExit):
        parse_args(["--chat-template", "no-such-template"])
    assert "--chat-template" in capsys.readouterr().err


def test_pooling_flag(capsys):
    assert parse_args([]).pooling == "mean"
    assert parse_args(["--pooling", "last"]).pooling == "last"
    with pytest.raises(SystemExit):
        parse_args(["--pooling", "cls"])
    assert "--pooling" in capsys.readouterr().err


def test_quantization_flag_is_for_the_default_model(capsys):
    assert parse_args(["--quantization", "w8a8"]).quantization == "w8a8"
    with pytest.raises(SystemExit):
        parse_args(["--vmfb", "m.vmfb", "--parameters", "a.irpa", "--model-config", "c.json", "--quantization", "w8a8"])
    assert "give them to python -m export.paged_llm" in capsys.readouterr().err


def test_config_file_takes_alias_spellings_and_command_line_aliases_win(tmp_path):
    conf = tmp_path / "c.json"
    conf.write_text(
        json.dumps(
            {
                "vmfb": "m.vmfb",
                "parameters": ["a.irpa"],
                "model_config": "c.json",
                "tokenizer_json": "file-tokenizer.json",
                "device_ids": [0, 1],
                "max_running_batch": 4,
                "max-queue": 9,
            }
        )
    )
    a = parse_args(["--config", str(conf)])
    assert a.tokenizer == Path("file-tokenizer.json") and a.device_ids == [0, 1] and a.max_running == 4
    assert a.max_queue == 9 and a.parameters == [Path("a.irpa")] and a.model_config == Path("c.json")
    for tok in (["--tokenizer_json", "cli.json"], ["--tokenizer=cli.json"], ["--tokenizer_j", "cli.json"]):
        b = parse_args(["--config", str(conf), *tok, "--max_running_batch", "2", "--device-ids", "3"])
        assert b.tokenizer == Path("cli.json") and b.max_running == 2 and b.device_ids == [3]


def test_server_started_with_a_config_file_uses_the_alias_flag_over_it(served_tiny, tmp_path):
    """The file names a tokenizer that does not exist: the server loads only if --tokenizer_json wins."""
    conf = tmp_path / "serve.json"
    conf.write_text(
        json.dumps(
            {
                "vmfb": str(served_tiny / "model.vmfb"),
                "parameters": [str(served_tiny / "model.irpa")],
                "model_config": str(served_tiny / "config.json"),
                "tokenizer": str(tmp_path / "no-such-tokenizer.json"),
                "max_running_batch": 2,
            }
        )
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serve", "--config", str(conf), "--tokenizer_json", str(served_tiny)]
    proc = subprocess.Popen([*cmd, "--port", str(port), "--log-level", "warning"], cwd=ROOT)
    try:
        wait_healthy(proc, url, 120)
        tokens = httpx.post(f"{url}/tokenize", json={"content": "ab"}, timeout=30).json()["tokens"]
        assert tokens == char_tokenizer()[0].encode("ab", add_special_tokens=False).ids
    finally:
        proc.terminate()
        proc.wait(timeout=30)
