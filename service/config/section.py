"""The base of every settings section: unknown keys are refused, values are frozen once validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A settings section: a frozen model that refuses unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)
