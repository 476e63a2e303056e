"""The strictness every section of the moaa config file is validated with (services/config.py and the
backend's own settings, services/backend/config.py)."""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    # strict: a quoted number or YAML's yes/on where a number belongs is the file's mistake, not a value;
    # finite: .inf as a limit would crash the throttle at start (leave a limit out for none)
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# a name something else refers to (a backend, recipe, ensemble, judge): never empty
Name = Annotated[str, Field(min_length=1)]
