"""The embedded stack's config and its clean-up of a model server left by a SIGKILLed run (no model needed)."""
import json
import subprocess
import time

import pytest

from moaa.errors import UserError
from moaa.pipeline.local import MODEL_ENV, default_target, local_config, local_model, reap_stale
from moaa.services.config import parse_config
from moaa.models import has_chat_template


def test_local_config_is_valid_and_uses_existing_templates():
    cfg = parse_config(local_config({"urls": ["http://127.0.0.1:9/v1"], "served_model": "smollm2"}, 50051, 50052))
    name, recipe = cfg.recipe(None)
    assert len(recipe.proposers) == 3 and len({p.system_prompt for p in recipe.proposers}) == 3
    assert len({p.sampling.temperature for p in recipe.proposers}) == 3
    _, ens = cfg.ensemble(None)
    assert ens.mode == "pairwise" and len(ens.judges) >= 2
    assert cfg.annotator_address == "127.0.0.1:50052"
    import moaa.services.annotator as ann
    from pathlib import Path
    templates = {p.stem for p in (Path(ann.__file__).parent / "templates").glob("*.txt")}
    assert {j.template for j in ens.judges} <= templates


def test_reap_stale_kills_only_the_recorded_process(tmp_path):
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    other = subprocess.Popen(["sleep", "301"], start_new_session=True)
    try:
        for _ in range(100):  # until the child has exec'd: before that its command line is pytest's
            cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read().decode()
            if cmdline.startswith("sleep"):
                break
            time.sleep(0.02)
        record = tmp_path / "model-server.pid.json"
        record.write_text(json.dumps([{"pid": proc.pid, "cmdline": cmdline},
                                      {"pid": other.pid, "cmdline": "not what it runs"}]))
        assert reap_stale(record) == 1
        assert proc.wait(10) == -9
        time.sleep(0.1)
        assert other.poll() is None            # a pid whose command line differs is left alone
        assert not record.exists()
    finally:
        other.kill()
        other.wait()


def test_a_trained_folder_takes_every_role_of_the_embedded_stack(tiny_sft_dir, tmp_path, monkeypatch):
    """The self-improvement loop's local route (README): `MOAA_LOCAL_MODEL=<trained folder>` is the model served
    in every role and the model trained; the trainer's output carries the chat template that `moaa backend serve`
    and the embedded engine require. A folder that is not there is the resolver's one line."""
    monkeypatch.setenv(MODEL_ENV, str(tiny_sft_dir))
    assert local_model() == str(tiny_sft_dir) and default_target() == str(tiny_sft_dir.resolve())
    assert has_chat_template(tiny_sft_dir)
    (tmp_path / "runs" / "dpo").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MODEL_ENV, "runs/sft")
    with pytest.raises(UserError, match=r"^MOAA_LOCAL_MODEL 'runs/sft': no such model folder \(runs/ holds dpo\)"):
        default_target()


async def test_a_bad_local_model_is_named_by_its_variable(tmp_path, monkeypatch):
    """A bad MOAA_LOCAL_MODEL is reported under that name, by the target resolution and by the embedded engine
    (the value came from the environment, not from a --model flag)."""
    from moaa.services.local.engine import EngineServer

    monkeypatch.setenv(MODEL_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"^MOAA_LOCAL_MODEL '.*nowhere' is not a packaged model"):
        default_target()
    srv = EngineServer(local_model(), source=MODEL_ENV, engine="transformers")
    with pytest.raises(UserError, match=r"^MOAA_LOCAL_MODEL '.*nowhere' is not a packaged model"):
        await srv.start()
    monkeypatch.setenv(MODEL_ENV, " ")
    with pytest.raises(UserError, match=r"^MOAA_LOCAL_MODEL is empty"):
        default_target()
