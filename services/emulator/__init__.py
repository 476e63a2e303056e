"""A load and fault emulator speaking the OpenAI chat API with no model (`moaa backend emulate`)."""
from .api_router import Emulator, run_emulator
from .protocol import EmulatorSettings
from .serving import EmulatorStats, expected_text

__all__ = ["Emulator", "EmulatorSettings", "EmulatorStats", "run_emulator", "expected_text"]
