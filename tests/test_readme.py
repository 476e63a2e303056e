"""README.md as an outside user follows it: every `moaa` command and flag it shows is accepted by the CLI's
parser, the configuration reference validates, the config keys and defaults it names are the typed models',
and every repository path it names exists. The README's example clients run against a real gateway in
tests/test_readme_clients.py."""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml

from moaa.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)
PROSE = BLOCK.sub("", README)


def code_blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall(README) if kind == lang]


def section(title: str) -> str:
    """The README text under a heading, up to the next heading of any level."""
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ )", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def _parse_error(argv: list[str]) -> str | None:
    """The parser's one error line for argv, or None when it parses."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(argv)
        except SystemExit as exit_:
            return err.getvalue().strip() or f"exit {exit_.code}"
    return None


def _command_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser that argv's leading command words select."""
    parser = build_parser()
    for word in argv:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or word not in sub.choices:
            break
        parser = sub.choices[word]
    return parser


def _takes_value(parser: argparse.ArgumentParser, flag: str) -> bool:
    action = parser._option_string_actions.get(flag.split("=", 1)[0])
    return action is not None and action.nargs != 0


def block_commands() -> list[tuple[list[str], list[str]]]:
    """(argv after `moaa`, flags of the `#   [--flag ...]` comment line under it) for each `moaa` command
    line in the README's bash blocks; `[--opt]` is an optional part, `...` a repeat."""
    found: list[tuple[list[str], list[str]]] = []
    for body in code_blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            if line.strip().startswith("#") and "[--" in line and found:
                found[-1][1].extend(re.findall(r"\[(--[\w-]+)", line))
                continue
            current, first = None, True  # `moaa` starts a command only as its first word
            for word in shlex.split(line, comments=True):
                if word in ("&&", "&", "|", ";"):
                    current, first = None, True
                    continue
                if word == "moaa" and first:
                    current = []
                    found.append((current, []))
                elif current is not None and word.strip("[]") != "...":
                    current.append(word.strip("[]"))
                first = False
    return found


# Placeholders in the prose's commands that stand for one of several words.
PLACEHOLDERS = {"KIND": "sft", "sft|dpo": "sft"}


def prose_commands() -> list[tuple[str, list[str]]]:
    """(span, argv after `moaa`) for each `moaa ...` span in the README's prose."""
    out = []
    for span in re.findall(r"`(moaa [^`]+)`", PROSE):
        text = span.replace("\n", " ").split(" | ")[0]
        words = []
        for word in shlex.split(text)[1:]:
            if re.fullmatch(r"--[\w-]+(/--[\w-]+)+", word):  # "--gateway/--annotator": either flag
                words.extend(word.split("/"))
            else:
                words.append(PLACEHOLDERS.get(word, word))
        argv = []
        for word in words:
            if word == "...":  # a value left out, or more of the same
                if argv and argv[-1].startswith("--") and _takes_value(_command_parser(argv), argv[-1]):
                    argv.append("X")
                continue
            argv.append(word)
        out.append((span, argv))
    return out


def test_readme_names_commands():
    """The extraction below finds the tour's commands (a README reshaped so they vanish fails here)."""
    heads = {" ".join(argv[:2]) for argv, _ in block_commands()}
    assert {"pipeline run", "gateway serve", "annotator serve", "train sft", "train submit", "backend emulate"} <= heads
    assert len(prose_commands()) > 20


@pytest.mark.parametrize("argv,comment_flags", block_commands(), ids=lambda v: " ".join(v)[:60] if v else "-")
def test_every_readme_command_parses(argv, comment_flags):
    """Each `moaa ...` line of a README code block parses as written, and so does each flag listed in the
    `#   [--flag ...]` comment under it."""
    assert _parse_error(argv) is None, f"`moaa {' '.join(argv)}`: {_parse_error(argv)}"
    known = _command_parser(argv)._option_string_actions
    assert [f for f in comment_flags if f not in known] == [], f"`moaa {' '.join(argv[:2])}` lacks these flags"


@pytest.mark.parametrize("span,argv", prose_commands(), ids=lambda v: v[:60] if isinstance(v, str) else "")
def test_every_prose_command_names_real_flags(span, argv):
    """A command quoted in the prose may leave out arguments or write placeholders for values (`--port N`),
    but its command words, flags and positional arguments must be the CLI's."""
    error = _parse_error(argv) or ""
    assert "unrecognized arguments" not in error and "invalid choice" not in error, f"`{span}`: {error}"
    known = _command_parser(argv)._option_string_actions
    assert [w for w in argv if w.startswith("--") and w.split("=")[0] not in known] == [], span


@pytest.mark.parametrize("argv", [a for a, _ in block_commands() if a[:2] == ["pipeline", "run"]], ids=" ".join)
def test_readme_pipeline_commands_pass_the_checks_made_before_a_run(argv):
    """Each README `moaa pipeline run` passes what is checked before anything runs (services, --target)."""
    from moaa.cli.pipeline import pipeline_options
    from moaa.pipeline.runner import _stages_to_run, check_services

    opts = pipeline_options(build_parser().parse_args(argv))
    check_services(opts, _stages_to_run(opts.until))


def test_connection_flags_are_on_every_command_the_readme_names():
    """"Every command that calls a moaa service (...) takes the same connection flags: ..." holds."""
    text = " ".join(PROSE.split())
    start = text.index("Every command that calls a moaa service (")
    commands, flags = text[start:text.index("requires mutual TLS", start)].split("takes the same connection flags")
    flags = set(re.findall(r"--[\w-]+", flags))
    assert {"--token", "--tls-ca", "--tls", "--tls-cert", "--tls-key"} <= flags
    for span in re.findall(r"`(moaa [^`]+)`", commands):
        argv = [w for w in shlex.split(span)[1:] if not w.startswith("--")]  # the command words
        known = _command_parser(argv)._option_string_actions
        assert sorted(flags - set(known)) == [], span


def test_configuration_reference_validates():
    """The configuration reference is one config a user can copy: it validates as it stands."""
    from moaa.services.config import parse_config

    (reference,) = code_blocks("yaml")
    cfg = parse_config(yaml.safe_load(reference), "README configuration reference")
    assert cfg.recipe(None)[0] == "moa" and cfg.ensemble(None)[0] == "moa-rm"


def _train_paragraph() -> str:
    text = " ".join(section("Training (SFT, DPO) with TRL").split())
    return text[text.index("Config keys ("):text.index("Any other field")]


def test_training_keys_are_the_typed_settings():
    """Every key the training section lists is a field of SFTSettings/DPOSettings (lora.{...} of
    LoraSettings), a TRL field it names, or a value of a moaa setting (`bf16`)."""
    import dataclasses
    import typing

    from moaa.trainer.config import LoraSettings
    from moaa.trainer.dpo import DPOSettings
    from moaa.trainer.sft import SFTSettings

    fields = {**SFTSettings.model_fields, **DPOSettings.model_fields}
    values = {v for f in fields.values() for v in typing.get_args(f.annotation) if isinstance(v, str)}
    trl = {f.name for cls in (SFTSettings, DPOSettings) for f in dataclasses.fields(cls.trl_class())}
    text = _train_paragraph()
    listed = text[text.index("typed as"):text.index("Defaults that differ")]
    unknown = []
    for key in re.findall(r"(?<!TRL's )`([\w.{},]+)`", listed):  # "TRL's `eval_dataset`" is TRL's word
        if key in ("SFTSettings", "DPOSettings") or key.endswith(".py"):
            continue
        group = re.fullmatch(r"(\w+)\.\{([\w,]+)\}", key)
        if group:
            unknown += [f"{group[1]}.{k}" for k in group[2].split(",") if k not in LoraSettings.model_fields]
        elif key not in fields and key not in values and key not in trl:
            unknown.append(key)
    assert unknown == []
    # and every setting is listed (model, data and out are the command's own flags; trl.* is TRL's)
    own = ("kind", "model", "data", "out", "trl", "lora")
    unlisted = [k for k in fields if f"`{k}`" not in listed and k not in own]
    assert unlisted == [], f"the README's training keys lack {unlisted}"


def test_training_defaults_are_the_typed_defaults():
    """"Defaults that differ from TRL's: `key` value, ..." states the typed settings' defaults."""
    from moaa.trainer.dpo import DPOSettings
    from moaa.trainer.sft import SFTSettings

    text = _train_paragraph()
    defaults = text[text.index("Defaults that differ"):]
    defaults = defaults[:defaults.index(". ")]
    stated = dict(re.findall(r"`(\w+)` ([\w.+-]+)", defaults))
    assert len(stated) >= 10, stated
    assert "2e-5 (SFT) / 5e-7 (DPO)" in defaults
    assert (SFTSettings.DEFAULT_LR, DPOSettings.DEFAULT_LR) == (2e-5, 5e-7)
    stated.pop("learning_rate")
    for key, value in stated.items():
        assert SFTSettings.model_fields[key].default == yaml.safe_load(value), key


def test_pipeline_set_keys_are_the_pipeline_settings():
    """The `--set` grammar section lists every pipeline setting, and nothing else."""
    from moaa.pipeline.runner import default_settings

    text = section("The `--set` grammar")
    listed = text[text.index("Pipeline keys:"):text.index("for the\ntraining settings")]
    keys = set(re.findall(r"`(\w+)`", listed))
    assert keys == set(default_settings(False)) - {"sft", "dpo"}


# Paths the README names that are not in a clone: made at run time, or on the user's machine or cluster.
NOT_IN_REPO = re.compile(r"^(/|~|<|moaa-run/|runs/|checkpoint-N|stage[12]-|batch/|vllm/|moaa/moaa)")


def test_every_named_path_exists():
    """Every repository path the README names in backticks exists (services/ subfolders may be named
    relative to services/, as the layout table does)."""
    named = {p.rstrip(".,:;") for p in re.findall(r"`([\w.<>~/-]+/[\w.<>/-]*)`", PROSE)}
    missing = [p for p in sorted(named) if not NOT_IN_REPO.match(p) and "://" not in p
               and not (ROOT / p).exists() and not (ROOT / "services" / p).exists()]
    assert missing == []


def _helm_block() -> str:
    (block,) = [b for b in code_blocks("bash") if b.startswith("helm install")]
    return block


@pytest.mark.parametrize("line", [ln for ln in _helm_block().splitlines() if ln.startswith("helm install")])
def test_readme_helm_installs_render_and_lint(helm, line):
    """Each `helm install` line, rendered and linted by the real helm (no cluster here: the boundary)."""
    argv = shlex.split(line, comments=True)
    assert argv[:4] == ["helm", "install", "moaa", "charts/moaa"]
    files = [argv[i + 1].removeprefix("charts/moaa/") for i, a in enumerate(argv) if a == "-f"]
    assert helm.template(files).of_kind("Deployment")
    helm.lint(files)


def test_readme_kubectl_names_are_the_charts(helm):
    """The Secret, key and Service the helm block's kubectl lines name, and the PVCs of its --set line."""
    rendered = helm.template([])
    block = _helm_block()
    secret = re.search(r"get secret (\S+) -o jsonpath='\{\.data\.(\w+)\}'", block)
    stored = rendered.get("Secret", secret[1])
    assert secret[2] in {**stored.get("data", {}), **stored.get("stringData", {})}  # the API serves both as data
    forward = re.search(r"port-forward svc/(\S+) (\d+):\d+", block)
    assert int(forward[2]) in [p["port"] for p in rendered.get("Service", forward[1])["spec"]["ports"]]
    (sets,) = re.findall(r"--set (persistence\S+)", README)
    claims = re.search(r"\(release moaa: ([\w, -]+)\)", README)[1].split(", ")
    pvcs = helm.template([], dict(kv.split("=") for kv in sets.split(","))).of_kind("PersistentVolumeClaim")
    assert sorted(p["metadata"]["name"] for p in pvcs) == sorted(claims)
