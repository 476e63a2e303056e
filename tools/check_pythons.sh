#!/usr/bin/env bash
# moaa as a user installs it, on every Python that requires-python admits: the wheel (not an editable
# checkout) in a fresh virtual environment per Python, without system site packages, with the core and
# test dependencies only (no torch: the local/train/vllm extras would pull gigabytes of CUDA wheels), then
# the test files that need no torch, run from a copy of tests/ outside the repository so that `import moaa`
# is the installed wheel.
#
#   tools/check_pythons.sh [PYTHON ...]     default: pyenv's 3.10, 3.11, 3.12 and 3.13
#   MOAA_CHECK_DIR=DIR keeps the venvs and logs there (default: a new folder under /tmp, removed at the end
#   unless KEEP=1); PYTEST_ARGS adds pytest arguments (e.g. PYTEST_ARGS=-x).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${MOAA_CHECK_DIR:-$(mktemp -d /tmp/moaa-pythons.XXXXXX)}
mkdir -p "$work"
if [ $# -eq 0 ]; then
  root=${PYENV_ROOT:-$HOME/.pyenv}
  for v in 3.10 3.11 3.12 3.13; do
    py=$(ls -d "$root"/versions/"$v".*/bin/python 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$py" ] && set -- "$@" "$py" || echo "no Python $v under $root/versions: skipped" >&2
  done
fi

# The wheel, built from the files a clean clone has (tracked and untracked-not-ignored; no build/ leftovers).
rm -rf "$work/src" "$work/dist" "$work/run"
mkdir -p "$work/src"
(cd "$repo" && git ls-files -co --exclude-standard | while read -r f; do [ -e "$f" ] && printf '%s\n' "$f"; done \
  | tar -cf - -T -) | tar -xf - -C "$work/src"
python3 -m pip wheel -q --no-deps --disable-pip-version-check -w "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/moaa-*.whl)
echo "wheel: $(basename "$wheel"), $(du -k "$wheel" | cut -f1) KiB"

# The tests, outside the repository, beside links to what they read from it (README, chart, proto, tools...).
mkdir -p "$work/run"
cp -r "$repo/tests" "$work/run/tests"
# Not moaa/: beside the tests it would be imported instead of the wheel (services/ and trainer/ install as
# moaa.services and moaa.trainer, so their folders are only read, as the README's path check does).
for f in "$repo"/* "$repo"/.ci; do
  case "$(basename "$f")" in moaa|tests|build|dist|*.egg-info) ;; *) ln -s "$f" "$work/run/" ;; esac
done
# Torch-free test files: none of the fixtures or imports that need a model, torch, transformers or TRL.
needs_torch='tiny_model_dir|tiny_verdict_model_dir|smollm2_(dir|engines|server|model)|tiny_sft_dir|build_tiny_model|^\s*(import|from) (torch|transformers|trl|datasets|peft)\b|matplotlib'
# Left out too: test_install, test_layering, test_chart_images and the README's path check read the
# repository's moaa/ sources (the CI runs them); test_k8s_builder, test_k8s_submit and the other deselected
# tests build training configs, which check TRL's arguments (`moaa train submit` needs the train extra).
mapfile -t files < <(cd "$work/run" && grep -LE "$needs_torch" tests/test_*.py \
  | grep -vE "test_(install|layering|chart_images|k8s_builder|k8s_submit)\.py")
deselect=(tests/test_readme.py::test_every_named_path_exists
          tests/test_chart.py::test_network_policy_lets_only_gateway_annotator_and_trainer_reach_models
          tests/test_chart.py::test_chart_storage_is_what_training_jobs_mount
          tests/test_readme.py::test_training_keys_are_the_typed_settings)
echo "${#files[@]} torch-free test files"

summary=()
for py in "$@"; do
  ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  venv="$work/venv$ver"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "$wheel[test]" > "$work/install$ver.log" 2>&1 \
    || { summary+=("$ver: install failed, see $work/install$ver.log"); continue; }
  where=$(cd "$work/run" && "$venv/bin/python" -c 'import moaa.services; print(moaa.services.__file__)')
  case "$where" in "$venv"/*) ;; *) summary+=("$ver: moaa imported from $where, not the venv"); continue ;; esac
  set +e
  (cd "$work/run" && "$venv/bin/pytest" -q -p no:cacheprovider -m "not slow and not vllm" \
    "${deselect[@]/#/--deselect=}" ${PYTEST_ARGS:-} "${files[@]}") \
    > "$work/pytest$ver.log" 2>&1
  rc=$?
  set -e
  summary+=("$ver: pytest exit $rc: $(tail -n 1 "$work/pytest$ver.log")")
done
printf '%s\n' "${summary[@]}"
if [ -z "${MOAA_CHECK_DIR:-}" ] && [ "${KEEP:-0}" != 1 ]; then rm -rf "$work"; else echo "logs and venvs: $work"; fi
! printf '%s\n' "${summary[@]}" | grep -qv "pytest exit 0"
