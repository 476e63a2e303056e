"""A load and fault emulator speaking the OpenAI chat API with no model (`moaa backend emulate`)."""
from .api_router import Emulator, add_arguments, run_emulator, settings_from_args
from .protocol import EmulatorSettings
from .serving import EmulatorStats, expected_text

__all__ = ["Emulator", "EmulatorSettings", "EmulatorStats", "add_arguments", "run_emulator",
           "settings_from_args", "expected_text"]
