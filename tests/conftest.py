"""Test fixtures are grouped per area in tests/fixtures/<area>.py and loaded as plugins here."""
import pytest

pytest_plugins = [
    "tests.fixtures.models",     # tiny and real models, real engine servers
    "tests.fixtures.emulator",   # load/fault emulator servers
    "tests.fixtures.trainer",    # training data, a tiny SFT run, a Kubernetes API emulator
    "tests.fixtures.annotator",  # judge emulator, annotator servers
    "tests.fixtures.gateway",    # gateways, in-process emulators, test certificates
    "tests.fixtures.helm",       # the real helm binary and chart renderers
]
