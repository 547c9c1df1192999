"""python -m serve's command line: --config files, shortfin spellings, clear errors."""

from pathlib import Path

import pytest

from serve.flags import parse_args

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
    assert "give it to python -m export.paged_llm" in capsys.readouterr().err
