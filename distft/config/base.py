"""What every config section shares: strictness (unknown keys fail) and the error that
carries one line per problem."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from distft.errors import UserError


class ConfigError(UserError):
    """A config that cannot be used; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
