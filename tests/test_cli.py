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
    assert "rows: 6 read, 3 usable, 3 unreadable or invalid, 0 that cannot be tokenized" in out
    assert "token lengths" in out and "longest sequence" in out
    assert "rows whose prompt alone reaches max_length (prompt cut from the start" in out
    assert "--long-prompts cut): 1" in out
    for expected in (
        f"{planted}, row 2, field 'rejected': identical to chosen",
        f"{planted}, row 3: not valid JSON",
        f"{planted}, row 4, field 'rejected[0].role': unknown role 'narrator'",
    ):
        assert expected in out
    assert "3 problem(s)" in out
    assert main(["data", "check", str(planted), "--max-length", "128", "--long-prompts", "error"]) == 0
    strict = capsys.readouterr().out
    assert f"{planted}, row 6, field 'prompt': the prompt alone is" in strict and "4 problem(s)" in strict


def test_data_check_with_no_usable_row_fails(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q?", "chosen": "same", "rejected": "same"}])
    assert main(["data", "check", str(path), "--model", "none"]) == 1
    assert "no usable rows" in capsys.readouterr().out


def test_data_check_reads_pairs_as_unpaired_rows_when_asked(tmp_path, capsys):
    rows = [
        {"prompt": "Q?", "completion": "A.", "label": True},
        {"prompt": "R?", "chosen": "a", "rejected": "b"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert main(["data", "check", str(path), "--model", "none", "--kind", "unpaired"]) == 0
    out = capsys.readouterr().out
    assert "format: unpaired" in out and "2 read, 3 usable" in out  # the pair as KTO reads it: two rows


def test_data_check_strict_fails_on_problems(planted, capsys):
    assert main(["data", "check", str(planted), "--model", "none"]) == 0
    assert main(["data", "check", str(planted), "--model", "none", "--strict"]) == 1


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


def test_chat_marks_a_reply_cut_by_the_token_limit(smollm2_path, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Describe the sea.\n/reset\n/exit\nnever read\n"))
    assert main(["chat", "smollm2", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "(cut off at 2 tokens: --max-new-tokens)" in out and "(conversation forgotten)" in out
    assert out.count("assistant:") == 1


def test_pipeline_refuses_a_bad_config_before_any_work(tmp_path, capsys):
    assert main(["pipeline", "configs/smollm2-pipeline.yaml", "dpo.betta=0.2", f"output_dir={tmp_path}"]) == 2
    assert "dpo.betta: unknown key; did you mean 'beta'?" in capsys.readouterr().err


def test_user_text_in_errors_is_not_read_as_markup(tmp_path, capsys):
    from tests.helpers import write_jsonl as w

    bad = w(
        tmp_path / "d.jsonl",
        [{"prompt": "Q?", "chosen": "a", "rejected": "b", "criteria_labels": {"x": "[/]"}}],
    )
    assert main(["data", "check", str(bad), "--model", "none"]) == 1  # its one row is bad
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


def _bad_config(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("output_dir: runs/caf\xe9\n".encode("latin-1"))
    return [str(path)]


def _twice(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("dpo:\n  beta: 0.1\n  beta: 0.5\n")
    return [str(path)]


def _eval_into_a_file(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    return ["--data", "builtin:criteria-heldout", "--out", str(taken)]


def _rows(tmp_path, name: str, bad: dict) -> list[str]:
    good = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}
    return [str(write_jsonl(tmp_path / f"{name}.jsonl", [good, bad, good]))]


def _conv(prompt: list[dict]) -> dict:
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Yes."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }


def _nul(tmp_path):
    return _rows(tmp_path, "nul", {"prompt": "Q?", "chosen": "a\u0000b", "rejected": "b"})


def _two_users(tmp_path):
    return _rows(tmp_path, "users", _conv([U, U]))


def _system_late(tmp_path):
    return _rows(tmp_path, "late", _conv([U, {"role": "system", "content": "Be terse."}, U]))


def _huge_row(tmp_path):
    return [
        *_rows(tmp_path, "huge", {"prompt": "word " * 2000, "chosen": "a", "rejected": "b"}),
        "--max-row-bytes",
        "1000",
    ]


def _preference_to_sft(tmp_path):
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": f"Q{i}?", "chosen": "a", "rejected": "b"} for i in range(16)]
    )
    return [f"sft.data.train=[{pairs}]", f"output_dir={tmp_path / 'run'}"]


# every case: what the user typed, the exit status, and what the message must say; none prints a
# traceback. `data check` lists a bad row and exits 0 (1 with --strict or with no usable row); a run
# stops with exit status 2.
CASES = {
    "generate, 0 new tokens": (["generate", "smollm2", "hi", "--max-new-tokens", "0"], "0 is not a positive"),
    "generate, -5 new tokens": (
        ["generate", "smollm2", "hi", "--max-new-tokens", "-5"],
        "-5 is not a positive",
    ),
    "generate, temperature -1": (
        ["generate", "smollm2", "hi", "--temperature", "-1"],
        "-1 is not a temperature",
    ),
    "chat, temperature nan": (["chat", "smollm2", "--temperature", "nan"], "nan is not a temperature"),
    "config not UTF-8": (["sft", _bad_config], "(byte 20 is 0xe9): save it as UTF-8"),
    "eval --out naming a file": (["eval", "smollm2", _eval_into_a_file], "is a file, not a folder"),
    "config with a key twice": (
        ["dpo", _twice],
        "line 3: 'beta' is given twice in one section (first on line 2)",
    ),
}
DATA_CASES = {  # (what the user typed, exit status, message)
    "a NUL in a row": (["data", "check", _nul, "--model", "none"], 0, "NUL character (at character 1)"),
    "a NUL in a row, --strict": (["data", "check", _nul, "--model", "none", "--strict"], 1, "NUL character"),
    "two user turns in a row": (
        ["data", "check", _two_users, "--model", "none"],
        0,
        "two user messages in a row",
    ),
    "a system message late": (["data", "check", _system_late, "--model", "none"], 0, "must come first"),
    "a row over the size limit": (["data", "check", _huge_row, "--model", "none"], 0, "row too large (10,"),
    "a preference file given to sft": (
        ["sft", _preference_to_sft],
        2,
        "16 rows (1, 2, 3, 4, 5, ...): looks like a preference row, but this dataset holds sft rows",
    ),
}


def _run(argv: list, tmp_path) -> int:
    # a long folder, as on a CI machine: a message naming it must not be broken over lines
    tmp_path = tmp_path / ("a-long-folder-name-" * 6)
    tmp_path.mkdir()
    argv = [a for x in argv for a in (x(tmp_path) if callable(x) else [x])]
    try:
        return main(argv)
    except SystemExit as e:  # refused by the argument parser, with its usage line
        return e.code


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistakes_are_one_message_and_exit_2(case, tmp_path, capsys):
    args, message = CASES[case]
    code = _run(args, tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_questionable_rows_are_reported_with_where_and_why(case, tmp_path, capsys):
    args, status, message = DATA_CASES[case]
    code = _run(args, tmp_path)
    out = capsys.readouterr()
    said = " ".join((out.out + out.err).split())  # the console wraps long lines
    assert code == status and message in said and "Traceback" not in said, said


def test_eval_reads_the_builtin_held_out_data_sampled_from_the_reference(tiny_llama_dir, tmp_path, capsys):
    """builtin:criteria-heldout, as the pipeline makes it: sampled from the model DPO started from."""
    code = main(
        [
            "eval",
            f"sft={tiny_llama_dir}",
            "--data",
            "builtin:criteria-heldout",
            "--reference",
            str(tiny_llama_dir),
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path / "cmp"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "cmp" / "comparison.md").is_file()


@pytest.mark.parametrize(
    "folder, method",
    [("dpo", "DPO"), ("dpo-finegrained", "DPO"), ("orpo", "ORPO"), ("orpo-mini", "ORPO"), ("kto", "KTO")],
)
def test_what_a_stage_trained_is_named_by_its_folder(folder, method):
    from criteriapo.stages.methods import title_of

    assert title_of(folder) == method
