"""The model cache and --model specs: packaged GGUF -> HF folder, folders, GGUF files, hub ids."""
from __future__ import annotations

import json
import time

import pytest

from moaa.cli.main import main
from moaa.errors import UserError
from moaa.models import MARKER, PACKAGED, prepare, resolve_model


def test_prepared_smollm2_folder_is_complete_and_reloads_instantly(smollm2_dir):
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", MARKER} <= names
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert json.loads((smollm2_dir / MARKER).read_text())["source"]["packaged"] == "smollm2-135m-instruct"
    t0 = time.monotonic()
    assert prepare("smollm2-135m-instruct") == smollm2_dir
    assert time.monotonic() - t0 < 1.0  # idempotent: the second call does no work


def test_prepared_smollm2_has_chat_template_and_answers(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_dict=True, return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][prompt["input_ids"].shape[1]:], skip_special_tokens=True)


def test_model_specs(tmp_path, tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)).path == tiny_model_dir.resolve()
    hub = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and hub.path is None
    assert hub.engine_arg == hub.default_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model("smollm2-135m-instruct", prepare_missing=False).default_name == "smollm2-135m-instruct"


@pytest.mark.parametrize("make, fragment", [
    (lambda d: str(d / "missing-folder"), "not a packaged model"),
    (lambda d: "smollm3", "not a packaged model"),
    (lambda d: "", "--model is empty"),
    (lambda d: (d / "empty").mkdir() or str(d / "empty"), "has no config.json"),
    (lambda d: (d / "weights.bin").write_text("x") and str(d / "weights.bin"), "not a .gguf file"),
])
def test_bad_model_specs_say_what_to_give(tmp_path, make, fragment):
    with pytest.raises(UserError) as info:
        resolve_model(make(tmp_path))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_missing_folder_under_an_existing_one_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """`runs/sft` mistyped or not trained yet, with runs/ here: the engine (or the trainer) spent minutes asking
    huggingface.co for a model "runs/sft" and then said it could not connect."""
    (tmp_path / "runs" / "dpo").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^--model 'runs/sft': no such model folder \(runs/ holds dpo\)"):
        resolve_model("runs/sft")


def test_unknown_packaged_name():
    with pytest.raises(UserError, match="packaged models: smollm2-135m-instruct, gemma3-270m"):
        prepare("nope")


def test_gemma_chunks_are_joined_in_order_and_checked():
    gemma = PACKAGED["gemma3-270m"]
    assert [w.member.rsplit(".", 1)[1] for w in gemma.wheels] == ["part00", "part01", "part02", "part03"]
    assert gemma.sha256 and gemma.chat_template and "<start_of_turn>" in gemma.chat_template


def test_gemma_template_renders_roles():
    from jinja2 import Template

    gemma = PACKAGED["gemma3-270m"]
    text = Template(gemma.chat_template).render(
        bos_token="<bos>", add_generation_prompt=True,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}])
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_cli_models_list_tiny_and_bad_prepare(tmp_path, capsys, smollm2_dir):
    assert main(["models", "list", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["name"] for r in rows} == set(PACKAGED)
    assert next(r for r in rows if r["name"] == "smollm2-135m-instruct")["prepared"]
    assert main(["models", "tiny", str(tmp_path / "tiny")]) == 0
    assert (tmp_path / "tiny" / "config.json").is_file()
    capsys.readouterr()
    assert main(["models", "prepare", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moaa: error: cannot prepare 'nope'") and err.count("\n") == 1


def test_tiny_verdict_model_judges_by_content_and_order(tiny_verdict_model_dir):
    """The verdict variant (services/local/tiny.py): at temperature 0 it writes only [[A]]/[[B]], the
    annotator reads a verdict from every reply, and for some answer pairs it prefers the same answer in
    both orders (what makes a preference pair), for others not (a tie): verdicts follow the content."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moaa.services.annotator.parsing import parse_verdict
    from moaa.services.annotator.templates import TemplateStore

    tok = AutoTokenizer.from_pretrained(tiny_verdict_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_verdict_model_dir)
    tpl = TemplateStore().get("pairwise_small_v1")

    def reply(a: str, b: str, q: str) -> str:
        ids = tok.apply_chat_template(tpl.render(instruction=q, answer_a=a, answer_b=b), add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    answers = ["Paris is the capital.", "Hello! How can I help?", "def add(a, b): return a + b",
               "Guten Morgen.", "1 2 3 4 5", "Write a short poem about the sea."]
    kinds = set()
    for i, (a, b) in enumerate(zip(answers, answers[1:] + answers[:1])):
        q = f"Explain topic number {i} in one short paragraph."
        r1, r2 = reply(a, b, q), reply(b, a, q)
        assert r1.replace("[[A]]", "").replace("[[B]]", "") == "" and r1, r1
        v1, v2 = parse_verdict(r1).verdict, parse_verdict(r2).verdict
        kinds.add("preference" if v1 != v2 else "tie")
    assert kinds == {"preference", "tie"}


@pytest.fixture
def packaged_tiny(tmp_path, tiny_model_dir, monkeypatch):
    """A model cache whose prepared `smollm2-135m-instruct` is the tiny model: the packaged name resolves
    through the real cache (no conversion, a fast model)."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_dir, cache / "smollm2-135m-instruct")
    (cache / "smollm2-135m-instruct" / MARKER).write_text(json.dumps({"source": {"test": "tiny"}}))
    monkeypatch.setenv("MOAA_CACHE", str(cache))
    return "smollm2-135m-instruct"


PROMPT = [{"role": "user", "content": "What is 2 plus 2?"}]


def test_sample_and_logprobs_take_a_packaged_name(packaged_tiny, tmp_path, capsys):
    """`--model` takes a packaged name in `moaa sample` and `moaa logprobs` too, as the README says."""
    prompts, out = tmp_path / "p.jsonl", tmp_path / "c.jsonl"
    prompts.write_text(json.dumps({"id": "q0", "prompt": PROMPT}) + "\n")
    assert main(["sample", "--model", packaged_tiny, "--prompts", str(prompts), "--out", str(out), "--n", "2",
                 "--max-new-tokens", "2", "--engine", "transformers"]) == 0
    row = json.loads(out.read_text())
    assert len(row["candidates"]) == 2 and {c["model"] for c in row["candidates"]} == {packaged_tiny}
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "a", "prompt": PROMPT,
                                 "completion": [{"role": "assistant", "content": "4."}]}) + "\n")
    assert main(["logprobs", "--model", f"base={packaged_tiny}", "--items", str(items),
                 "--out", str(tmp_path / "lp.json")]) == 0
    lp = json.loads((tmp_path / "lp.json").read_text())["base"]["a"]
    assert lp[0] < 0 and lp[1] > 0


@pytest.mark.parametrize("argv", [
    ["sample", "--model", "runs/sft", "--prompts", "p.jsonl", "--out", "o.jsonl"],
    ["logprobs", "--model", "base=smollm2-135m-instruct", "--model", "sft=runs/sft", "--items", "i.jsonl",
     "--out", "lp.json"],
])
def test_sample_and_logprobs_say_what_train_says_for_a_missing_folder(argv, packaged_tiny, tmp_path, monkeypatch,
                                                                      capsys):
    """The one resolver's line, before any model loads (logprobs: the second model's, before the first loads)."""
    (tmp_path / "runs" / "dpo").mkdir(parents=True)
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "q0", "prompt": PROMPT}) + "\n")
    (tmp_path / "i.jsonl").write_text(json.dumps({"id": "a", "prompt": PROMPT, "completion": PROMPT}) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("moaa: error: --model 'runs/sft': no such model folder (runs/ holds dpo); give an existing model "
                   "folder (org/name is read as a hub id only where no folder org/ is here)")
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "lp.json").exists()


@pytest.mark.parametrize("rows, extra, message", [
    ([{"id": "a", "prompt": PROMPT, "completion": PROMPT}, {"id": "a", "prompt": PROMPT, "completion": PROMPT}], [],
     "i.jsonl: line 2: id 'a' appears twice (first at line 1)"),
    ([{"id": "a", "prompt": [{"role": "user", "content": 5}], "completion": PROMPT}], [],
     "i.jsonl: line 1: prompt[0] content is not a string"),
    ([{"id": "a", "prompt": [], "completion": PROMPT}], [], "i.jsonl: line 1: field 'prompt' must be a string or a non-empty list"),
    ([{"id": ["l"], "prompt": PROMPT, "completion": PROMPT}], [], "i.jsonl: line 1: expected {id, prompt"),
    ([{"id": "a", "prompt": PROMPT, "completion": PROMPT, "models": "base2"}], [],
     "i.jsonl: line 1: 'models' must be a list of model names"),
    ([{"id": "a", "prompt": PROMPT, "completion": PROMPT}], ["--model", "base=x"], "--model base=... is given twice"),
    ([{"id": "a", "prompt": PROMPT, "completion": PROMPT}], ["--out", "nodir/lp.json"],
     "--out nodir/lp.json: folder nodir does not exist"),
])
def test_logprobs_bad_input_is_one_line_before_any_model_loads(rows, extra, message, packaged_tiny, tmp_path,
                                                               monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["logprobs", "--model", f"base={packaged_tiny}", "--items", "i.jsonl", "--out", "lp.json", *extra]
    if "--out" in extra:
        argv = argv[:-4] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_models_tiny_prints_the_folder_alone(tmp_path):
    """D=$(moaa models tiny DIR) is the folder: what the libraries write while building goes to stderr."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "moaa.cli.main", "models", "tiny", str(tmp_path / "t")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout == f"{tmp_path / 't'}\n", (out.stdout, out.stderr[-500:])
    empty = subprocess.run([sys.executable, "-m", "moaa.cli.main", "models", "tiny", ""], capture_output=True,
                           text=True, timeout=60, cwd=tmp_path)
    assert empty.returncode == 2 and "give a folder to build the tiny model in" in empty.stderr
