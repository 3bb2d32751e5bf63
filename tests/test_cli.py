"""The command line, called as a user would (in process)."""

from __future__ import annotations

import pytest

from criteriapo.cli import main
from tests.helpers import write_jsonl

U = {"role": "user", "content": "What is the capital of France?"}


@pytest.fixture
def planted(tmp_path):
    rows = [
        {
            "prompt": [U],
            "chosen": [{"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "assistant", "content": "Lyon."}],
        },
        {
            "prompt": [U],
            "chosen": [{"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "assistant", "content": "Paris."}],
        },
        b'{"prompt": "broken',
        {
            "prompt": [U],
            "chosen": [{"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "narrator", "content": "Lyon."}],
        },
        {
            "chosen": [U, {"role": "assistant", "content": "It is Paris."}],
            "rejected": [U, {"role": "assistant", "content": "It is Nice."}],
        },
        {
            "prompt": [{"role": "user", "content": "long " * 300}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
    ]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def test_data_check_reports_format_counts_lengths_and_problems(planted, smollm2_path, capsys):
    assert main(["data", "check", str(planted), "--max-length", "128"]) == 0
    out = capsys.readouterr().out
    assert "format: preference (conversational: 3, implicit prompt: 1)" in out
    assert "rows: 6 read, 3 usable, 3 bad" in out
    assert "token lengths" in out and "longest sequence" in out
    for expected in (
        f"{planted}, row 2, field 'rejected': identical to chosen",
        f"{planted}, row 3: not valid JSON",
        f"{planted}, row 4, field 'rejected[0].role': unknown role 'narrator'",
        f"{planted}, row 6, field 'prompt': the prompt alone is",
    ):
        assert expected in out
    assert "4 problem(s)" in out


def test_data_check_strict_fails_on_problems(planted, capsys):
    assert main(["data", "check", str(planted), "--model", "none"]) == 0
    with pytest.raises(SystemExit) as e:
        main(["data", "check", str(planted), "--model", "none", "--strict"])
    assert e.value.code == 1


def test_errors_are_one_clear_line_and_exit_2(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "missing.jsonl"), "--model", "none"]) == 2
    assert "error:" in capsys.readouterr().err


def test_models_list_and_fetch(smollm2_path, capsys):
    assert main(["models", "fetch", "smollm2"]) == 0
    assert "already fetched" in capsys.readouterr().out
    assert main(["models", "list"]) == 0
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in capsys.readouterr().out


def test_generate(smollm2_path, capsys):
    assert main(["generate", "smollm2", "What is the capital of France?", "--max-new-tokens", "16"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_chat_streams_a_reply_and_keeps_the_conversation(smollm2_path, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n\n"))
    assert main(["chat", "smollm2", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "assistant:" in out and "Paris" in out


def test_pipeline_refuses_a_bad_config_before_any_work(tmp_path, capsys):
    assert main(["pipeline", "configs/smollm2-pipeline.yaml", "dpo.betta=0.2", f"output_dir={tmp_path}"]) == 2
    assert "dpo.betta: unknown key; did you mean 'beta'?" in capsys.readouterr().err


def test_user_text_in_errors_is_not_read_as_markup(tmp_path, capsys):
    from tests.helpers import write_jsonl as w

    bad = w(
        tmp_path / "d.jsonl",
        [{"prompt": "Q?", "chosen": "a", "rejected": "b", "criteria_labels": {"x": "[/]"}}],
    )
    assert main(["data", "check", str(bad), "--model", "none"]) == 0
    assert "got '[/]'" in capsys.readouterr().out
    assert (
        main(
            [
                "dpo",
                "configs/smollm2-pipeline.yaml",
                f"dpo.data.train={bad}",
                "dpo.data.eval=[]",
                f"output_dir={tmp_path / 'run'}",
                "model.name_or_path=[/bold]x",
            ]
        )
        == 2
    )
    assert "error: [/bold]x: not in the local" in capsys.readouterr().err
