"""The strictness every section of the moaa config file is validated with (services/config.py and the
backend's own settings, services/backend/config.py)."""
from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class Strict(BaseModel):
    # strict: a quoted number or YAML's yes/on where a number belongs is the file's mistake, not a value;
    # finite: .inf as a limit would crash the throttle at start (leave a limit out for none)
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# a name something else refers to (a backend, recipe, ensemble, judge): never empty
Name = Annotated[str, Field(min_length=1)]
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_name(name: str) -> str:
    # never echo the value: the usual mistake is pasting the secret itself here (it would reach the logs)
    if not _ENV_NAME.fullmatch(name):
        raise ValueError("must be the name of an environment variable (letters, digits, _) that holds the secret, "
                         "not the secret itself")
    return name


# the name of an environment variable holding a secret (an API key, bearer tokens)
# (the pattern in its JSON schema: the chart's values.schema.json refuses the same at `helm install`)
EnvName = Annotated[str, AfterValidator(_env_name), Field(json_schema_extra={"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"})]
