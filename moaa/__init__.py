"""moaa: Mixture-of-Agents Alignment as services.

Import layout: `moaa` is the top package; the repository's `services/` and `trainer/` folders are
installed as `moaa.services` and `moaa.trainer` (see setup.py); generated gRPC stubs live in `moaa.v1`.
"""
__version__ = "0.1.0"
