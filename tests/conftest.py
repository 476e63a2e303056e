"""Test fixtures are grouped per area in tests/fixtures/<area>.py and loaded as plugins here."""
import os
import signal

# Idle OpenMP threads spin by default and starve the model servers and trainers that the tests run beside
# each other on a small CPU (one request 5-10x slower); passive waiting fixes that, for child processes too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# A suite started in the background by a non-interactive shell (nohup, a CI runner's `cmd &`) inherits
# SIGINT ignored, and so would every command it starts: the tests that Ctrl-C a child would see it run on.
# Restore the default here, as an interactive shell gives it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

pytest_plugins = [
    "tests.fixtures.models",     # tiny and real models, real engine servers
    "tests.fixtures.emulator",   # load/fault emulator servers
    "tests.fixtures.trainer",    # training data, a tiny SFT run, a Kubernetes API emulator
    "tests.fixtures.annotator",  # judge emulator, annotator servers
    "tests.fixtures.gateway",    # gateways, in-process emulators, test certificates
    "tests.fixtures.helm",       # the real helm binary and chart renderers
]
