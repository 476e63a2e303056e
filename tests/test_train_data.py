"""Data checks before any step: each bad file stops the CLI with exit 2 and one line naming the rows."""
from __future__ import annotations

import json

import pytest

from moaa.cli.main import main
from moaa.errors import UserError
from moaa.trainer.data import check_lengths, file_sha256, load_rows
from tests.fixtures.trainer import pref_rows, sft_rows, write_jsonl

U = {"role": "user", "content": "Hi?"}
A = {"role": "assistant", "content": "Hello."}


def _cli(kind, path, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["train", kind, "--data", str(path), "--model", str(tmp_path / "no-model"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert not out.exists(), "nothing may start before the data is checked"
    return err


def test_not_json(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [sft_rows(1)[0], '{"messages": [', sft_rows(2)[1], "not json at all"])
    err = _cli("sft", path, tmp_path, capsys)
    assert "2 bad row(s)" in err and "line 2" in err and "line 4" in err and "not JSON" in err


def test_wrong_schema(tmp_path, capsys):
    rows = [{"id": "a", "conversation": [U, A]}, {"id": "b", "messages": [U, {"role": "bot", "content": "x"}]}]
    err = _cli("sft", write_jsonl(tmp_path / "d.jsonl", rows), tmp_path, capsys)
    assert "line 1 (id a): missing field 'messages'" in err
    assert "line 2 (id b): messages[1] has role 'bot'" in err


def test_empty_assistant_turn(tmp_path, capsys):
    rows = sft_rows(2) + [{"id": "e", "messages": [U, {"role": "assistant", "content": "  "}]}]
    err = _cli("sft", write_jsonl(tmp_path / "d.jsonl", rows), tmp_path, capsys)
    assert "line 3 (id e): messages[1] (assistant) is empty" in err


def test_chosen_equals_rejected(tmp_path, capsys):
    rows = pref_rows(2)
    rows[1]["rejected"] = rows[1]["chosen"]
    err = _cli("dpo", write_jsonl(tmp_path / "p.jsonl", rows), tmp_path, capsys)
    assert "line 2 (id p1): chosen equals rejected" in err


def test_pretemplated_strings_are_refused(tmp_path, capsys):
    rows = [{"id": "t", "prompt": "<|im_start|>user\nHi?<|im_end|>\n", "chosen": "Hello", "rejected": "Go away"}]
    err = _cli("dpo", write_jsonl(tmp_path / "p.jsonl", rows), tmp_path, capsys)
    assert "id t" in err and "prompt is a string (TRL's standard format, or pre-templated text)" in err
    err = _cli("sft", write_jsonl(tmp_path / "s.jsonl", [{"id": "x", "text": "<s>[INST] hi [/INST] yo"}]), tmp_path, capsys)
    assert "pre-templated text" in err


def test_wrong_kind_of_file(tmp_path, capsys):
    err = _cli("sft", write_jsonl(tmp_path / "p.jsonl", pref_rows(2)), tmp_path, capsys)
    assert "a preference row where an SFT row" in err and "line 1 (id p0), line 2 (id p1)" in err


@pytest.mark.parametrize("messages,problem", [
    ([A, U], "messages[0] is 'assistant' where 'user' is expected"),
    ([U, U, A], "messages[1] is 'user' where 'assistant' is expected"),
    ([U], "messages must end with a assistant message"),
    ([{"role": "system", "content": "s"}], "holds only a system message"),
    ([U, {"role": "system", "content": "late"}, A], "messages[1] is 'system' where 'assistant' is expected"),
    ([], "must be a non-empty list"),
    ([U, {"role": "assistant", "content": 3}], "content must be a string"),
])
def test_conversation_shape(tmp_path, messages, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "r", "messages": messages}])
    with pytest.raises(UserError, match="line 1 \\(id r\\)") as info:
        load_rows(path, "sft")
    assert problem in str(info.value)


@pytest.mark.parametrize("field,value,problem", [
    ("chosen", [A, A], "exactly one assistant message"),
    ("rejected", [U], "rejected[0] has role 'user'"),
    ("prompt", [U, A], "prompt must end with a user message"),
])
def test_preference_shape(tmp_path, field, value, problem):
    row = pref_rows(1)[0] | {field: value}
    with pytest.raises(UserError, match="line 1") as info:
        load_rows(write_jsonl(tmp_path / "p.jsonl", [row]), "dpo")
    assert problem in str(info.value)


def test_duplicates_dropped_and_counted_duplicate_ids_refused(tmp_path):
    rows = sft_rows(3)
    copy = dict(rows[0], id="again")
    kept, report = load_rows(write_jsonl(tmp_path / "d.jsonl", rows + [copy, ""]), "sft")
    assert [r["id"] for r in kept] == ["s0", "s1", "s2"]
    assert report.dropped == {"duplicate of s0": ["again"]} and report.blank_lines == 1
    assert report.summary()["dropped"]["duplicate of s0"]["count"] == 1
    with pytest.raises(UserError, match="line 4 \\(id again\\): same content as s0"):
        load_rows(write_jsonl(tmp_path / "d.jsonl", rows + [copy]), "sft", drop_duplicates=False)
    with pytest.raises(UserError, match="line 4 \\(id s1\\): duplicate id, first on line 2"):
        load_rows(write_jsonl(tmp_path / "d.jsonl", rows + [sft_rows(5)[4] | {"id": "s1"}]), "sft")


def test_overlong_rows_stop_or_are_dropped_and_counted(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = sft_rows(2) + [{"id": "long", "messages": [U, {"role": "assistant", "content": "word " * 400}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    kept, report = load_rows(path, "sft")
    with pytest.raises(UserError, match=r"line 3 \(id long\): \d+ tokens > max_length 200 .*drop_overlong"):
        check_lengths(kept, report, tok, 200)
    kept = check_lengths(kept, report, tok, 200, drop_overlong=True)
    assert [r["id"] for r in kept] == ["s0", "s1"] and report.dropped == {"longer than max_length 200": ["long"]}
    assert report.rows_kept == 2


def test_many_bad_rows_one_line_capped(tmp_path):
    rows = [{"id": f"x{i}", "messages": [U]} for i in range(20)]
    with pytest.raises(UserError) as info:
        load_rows(write_jsonl(tmp_path / "d.jsonl", rows), "sft")
    msg = str(info.value)
    assert "20 bad row(s)" in msg and "and 12 more" in msg and "\n" not in msg


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_rows(tmp_path / "nope.jsonl", "sft")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="no usable rows"):
        load_rows(tmp_path / "e.jsonl", "sft")


def test_files_written_by_trl_users(tmp_path, capsys):
    """TRL's conversational rows load as TRL reads them (no ids, implicit prompts split at the first differing
    turn as trl.maybe_extract_prompt does, a BOM, a .gz); its standard string rows get one line saying what to give."""
    import gzip

    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [U, A]}])
    sft.write_bytes(b"\xef\xbb\xbf" + sft.read_bytes().replace(b"\n", b"\r\n"))
    kept, _ = load_rows(sft, "sft")
    assert kept == [{"id": "line-1", "line": 1, "messages": [U, A]}]
    no = {"role": "assistant", "content": "No."}
    implicit = {"chosen": [U, A], "rejected": [U, no]}                                # trl-lib/ultrafeedback_binarized
    h4 = {"prompt": "Hi?", "prompt_id": "x", "chosen": [U, A], "rejected": [U, no], "messages": [U, A]}   # HuggingFaceH4's
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in (implicit, h4 | {"id": "h"})).encode()))
    kept, report = load_rows(path, "dpo")
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in kept] == [([U], [A], [no])]
    assert report.dropped == {"duplicate of line-1": ["h"]}   # both rows hold the same pair
    std = write_jsonl(tmp_path / "std.jsonl", [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}])
    err = _cli("dpo", std, tmp_path, capsys)
    assert "line 1: prompt is a string (TRL's standard format" in err and "give a list of" in err
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": [U], "completion": [A]}])   # trl-lib's prompt-completion
    kept, report = load_rows(pc, "sft")
    assert kept == [{"id": "line-1", "line": 1, "prompt": [U], "completion": [A]}]
    assert report.format == "prompt-completion" and report.summary()["format"] == "prompt-completion"
    std = write_jsonl(tmp_path / "std-pc.jsonl", [{"prompt": "The sky is", "completion": " blue."}])
    assert "line 1: prompt is a string (TRL's standard format" in _cli("sft", std, tmp_path, capsys)
    (tmp_path / "folder").mkdir()
    assert "folder is a folder but not a saved Hugging Face dataset" in _cli("sft", tmp_path / "folder", tmp_path, capsys)
    assert "unknown data format; use .jsonl" in _cli("sft", write_jsonl(tmp_path / "d.csv", ["a,b"]), tmp_path, capsys)
    array = tmp_path / "alpaca_style.json"   # one JSON array: rows numbered as rows
    array.write_text(json.dumps([{"messages": [U, A]}, {"messages": [U]}], indent=1))
    assert "array.json: 1 bad row(s): row 2: messages must end with a assistant message" in \
        _cli("sft", array, tmp_path, capsys).replace("alpaca_style", "array")


def test_openai_content_parts_are_joined_and_other_parts_refused(tmp_path, capsys):
    """OpenAI-format rows whose content is a list of text parts train on the joined text (newlines between
    parts, as for prompts), in every format; the chat template never sees the list. An image part is one line."""
    def parts(*texts):
        return [{"type": "text", "text": t} for t in texts]
    user = {"role": "user", "content": parts("Read this:", "Hi?")}
    answer = {"role": "assistant", "content": parts("Hello.")}
    joined_user = {"role": "user", "content": "Read this:\nHi?"}
    kept, _ = load_rows(write_jsonl(tmp_path / "m.jsonl", [{"id": "m", "messages": [user, answer]}]), "sft")
    assert kept[0]["messages"] == [joined_user, A]
    kept, report = load_rows(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": [user], "completion": [answer]}]), "sft")
    assert (kept[0]["prompt"], kept[0]["completion"], report.format) == ([joined_user], [A], "prompt-completion")
    no = {"role": "assistant", "content": parts("No.")}
    implicit = {"chosen": [user, answer], "rejected": [U | {"content": parts("Read this:", "Hi?")}, no]}
    kept, _ = load_rows(write_jsonl(tmp_path / "p.jsonl", [implicit]), "dpo")
    assert (kept[0]["prompt"], kept[0]["chosen"], kept[0]["rejected"]) == \
        ([joined_user], [A], [{"role": "assistant", "content": "No."}])
    image = {"role": "user", "content": parts("What is this?") + [{"type": "image_url", "image_url": {"url": "x"}}]}
    err = _cli("sft", write_jsonl(tmp_path / "img.jsonl", [{"id": "i", "messages": [image, A]}]), tmp_path, capsys)
    assert "line 1 (id i): messages[0] content has a 'image_url' part; only text parts" in err


def test_hub_shaped_files_parquet_and_saved_datasets_folders(tmp_path, capsys):
    """A dataset as the Hub and `datasets` hand it over (Parquet shards, `save_to_disk` folders) is read by the
    same reader as the pipeline's prompts, rows numbered as rows; its hash covers the folder's files."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    no = {"role": "assistant", "content": "No."}
    ufb = [{"prompt": f"Q{i}?", "prompt_id": f"x{i}", "chosen": [U | {"content": f"Q{i}?"}, A],
            "rejected": [U | {"content": f"Q{i}?"}, no], "score_chosen": 8.0, "score_rejected": 2.0} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(ufb), tmp_path / "train-00000-of-00001.parquet")
    kept, report = load_rows(tmp_path / "train-00000-of-00001.parquet", "dpo")
    assert [(r["id"], r["prompt"], r["chosen"]) for r in kept] == [(f"row-{i + 1}", [U | {"content": f"Q{i}?"}], [A])
                                                                    for i in range(3)]
    assert report.unit == "row" and report.rows_kept == 3 and len(report.sha256) == 64
    ids = [{"id": "a"} | ufb[0], {"id": None} | ufb[1]]   # an id column with a null: that row is named by number
    pq.write_table(pa.Table.from_pylist(ids), tmp_path / "ids.parquet")
    assert [r["id"] for r in load_rows(tmp_path / "ids.parquet", "dpo")[0]] == ["a", "row-2"]
    bad = ufb[:1] + [ufb[1] | {"rejected": [ufb[1]["chosen"][0], no | {"content": " "}]}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    assert "row 2: rejected[0] (assistant) is empty" in _cli("dpo", tmp_path / "bad.parquet", tmp_path, capsys)

    pc = [{"prompt": [U], "completion": [A | {"content": f"Hello {i}."}]} for i in range(2)]
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(pc),
                          "test": datasets.Dataset.from_list(pc[:1])}).save_to_disk(str(folder))
    kept, report = load_rows(folder, "sft")
    assert len(kept) == 2 and report.format == "prompt-completion"   # the train split
    assert load_rows(folder / "test", "sft")[1].rows_kept == 1       # one split's folder
    first = report.sha256
    assert file_sha256(folder) == first and load_rows(folder / "test", "sft")[1].sha256 != first
    two = tmp_path / "two"
    datasets.DatasetDict({"a": datasets.Dataset.from_list(pc), "b": datasets.Dataset.from_list(pc)}).save_to_disk(str(two))
    err = _cli("sft", two, tmp_path, capsys)
    assert "has splits a, b" in err and f"give one split's folder ({two / 'a'})" in err


S = {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("row,problem", [
    ({"prompt": [U], "completion": []}, "completion must be a non-empty list of messages"),
    ({"prompt": [U], "completion": "Hello."}, "completion is a string (TRL's standard format"),
    ({"prompt": [U, A], "completion": [A]}, "prompt must end with a user message"),
    ({"prompt": [S], "completion": [A]}, "prompt holds only a system message"),
    ({"prompt": [U], "completion": [U, A]}, "prompt + completion[1] is 'user' where 'assistant' is expected"),
    ({"prompt": [U], "completion": [A, U]}, "prompt + completion must end with a assistant message"),
    ({"completion": [A]}, "a completion without a prompt"),
    ({"prompt": [U]}, "pre-templated text"),
])
def test_prompt_completion_shape(tmp_path, row, problem):
    with pytest.raises(UserError, match="line 1") as info:
        load_rows(write_jsonl(tmp_path / "d.jsonl", [row]), "sft")
    assert problem in str(info.value)


def test_prompt_completion_rows_load_multi_turn_and_one_format_per_file(tmp_path, capsys):
    no = {"role": "assistant", "content": "No."}
    multi = {"id": "m", "prompt": [S, U, A, U], "completion": [no]}
    kept, report = load_rows(write_jsonl(tmp_path / "pc.jsonl", [multi]), "sft")
    assert kept[0]["prompt"] == [S, U, A, U] and kept[0]["completion"] == [no] and "messages" not in kept[0]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [multi, {"id": "x", "messages": [U, A]}])
    err = _cli("sft", mixed, tmp_path, capsys)
    assert "line 2 (id x): a messages row in a file of prompt-completion rows (line 1)" in err
    # eval data is tokenized and masked as the training data is: one format for both
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(2))
    out = tmp_path / "out"
    rc = main(["train", "sft", "--data", str(data), "--eval-data", str(tmp_path / "pc.jsonl"),
               "--model", str(tmp_path / "no-model"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and not out.exists()
    assert "pc.jsonl holds prompt-completion rows and" in err and "messages rows" in err


def test_multi_gpu_launch_checks_data_once_before_starting_workers(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [sft_rows(1)[0], "{broken"])
    rc = main(["train", "sft", "--data", str(path), "--model", "m", "--out", str(tmp_path / "o"),
               "--nproc-per-node", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "line 2: not JSON" in err and len(err.splitlines()) == 1


def test_written_rows_load_in_trl_trainers(tmp_path, tiny_model_dir):
    """What moaa writes (stage 1's SFT rows, the one preference row schema with its provenance) is read by
    `datasets.load_dataset("json")` and prepared by the installed TRL's SFTTrainer and DPOTrainer as they are."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from moaa.client.pairs import pair_row
    from moaa.v1 import annotator_pb2 as pb, common_pb2

    def pair(i):
        req = pb.AnnotateRequest(id=f"p{i}", prompt=[common_pb2.Message(role="user", content=f"Q{i} 🤖?")],
                                 candidates=[pb.Candidate(id="c0", text=f"good {i}", model="sft"),
                                             pb.Candidate(id="c1", text=f"bad {i}", model="sft")])
        judge = pb.JudgeReport(judge="j", model="m", scores=[pb.JudgeScore(candidate_id="c0", score=1.0),
                                                             pb.JudgeScore(candidate_id="c1", abstained=bool(i))])
        usage = [common_pb2.ModelUsage(model="m", usage=common_pb2.Usage(prompt_tokens=3), requests=1)] if i else []
        return pair_row(req, pb.AnnotateResponse(chosen_id="c0", rejected_id="c1", margin=float("nan") if i else 1.0,
                                                 combined=[pb.CandidateScore(candidate_id="c0", score=1.0)],
                                                 judges=[judge], usage=usage))
    sft = [{"id": f"s{i}", "messages": [U, {"role": "assistant", "content": f"Hello {i}."}],
            "moa": {"recipe": "r", "aggregator": "a", "proposals": [{"layer": 0, "model": "p", "used": True,
                                                                     "trimmed": False}],
                    "failures": [], "finish_reason": "stop", "latency_s": 0.1}, "usage": {}} for i in range(2)]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for kind, rows in (("sft", sft), ("dpo", [pair(0), pair(1)])):
        path = write_jsonl(tmp_path / f"{kind}.jsonl", rows)
        load_rows(path, kind)   # our own check agrees
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
        common = {"output_dir": str(tmp_path / kind), "report_to": [], "max_length": 64, "use_cpu": True}
        trainer = (SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=ds, processing_class=tok)
                   if kind == "sft" else
                   DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=ds, processing_class=tok))
        batch = next(iter(trainer.get_train_dataloader()))
        assert any(k.endswith("input_ids") for k in batch), (kind, list(batch))


def test_out_that_is_a_file_is_one_line(tmp_path, tiny_model_dir, capsys):
    data, out = write_jsonl(tmp_path / "d.jsonl", sft_rows(2)), tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    rc = main(["train", "sft", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == f"moaa: error: --out {out} is a file; give a folder (new, or one to resume)"
    assert out.read_text() == "keep me\n"
