"""What the admin API and the CLI accept to create or change an API key."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from appliance.accounts.credentials import MAX_SECRET, SECRET_PATTERN
from appliance.common.config import GuardrailName

BackendName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
UpstreamSecret = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SECRET, pattern=SECRET_PATTERN)]


class KeyFields(BaseModel):
    """Every settable field; on create, absent fields take these defaults; on update, absent means unchanged."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    role: Literal["admin", "user", "read-only"] = "user"
    models: list[str] = Field(default_factory=lambda: ["*"], max_length=200)
    endpoints: list[str] | None = Field(None, max_length=200)
    expires_at: float | None = None
    enabled: bool = True
    rpm: int | None = Field(None, gt=0)
    tpm: int | None = Field(None, gt=0)
    max_concurrent: int | None = Field(None, gt=0)
    budget_usd: float | None = Field(None, ge=0)
    budget_tokens: int | None = Field(None, ge=0)
    budget_period: Literal["day", "week", "month"] | None = None
    budget_counts: Literal["price", "compute", "both"] = Field(
        "price", description="What budget_usd counts: token prices from [[models]] (price), the compute cost of "
        "backends with a cost_per_hour (compute), or their sum (both).")
    weight: float | None = Field(
        None, gt=0, le=1000, allow_inf_nan=False,
        description="The key's share when requests wait for a backend at capacity: a key of weight 2 gets twice the "
        "turns of a key of weight 1 (null: [admission] default_weight).")
    metadata: dict[str, Any] = Field(default_factory=dict)
    guardrails: list[GuardrailName] = Field(
        default_factory=list, max_length=8,
        description="Guardrails every request of this key gets (pii, content_moderation, schema_validation); a "
        "request may add others but never drop these.")
    upstream_keys: dict[BackendName, UpstreamSecret | None] = Field(
        default_factory=dict, max_length=64,
        description="The key's own API key per backend name, used instead of the backend's api_key for this key's "
        "requests (null removes one). Stored encrypted; answers list only the backend names.")

    @field_validator("models", "endpoints")
    @classmethod
    def _patterns(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not isinstance(p, str) or not p.strip() for p in value):
            raise ValueError("patterns must be non-empty strings")
        return value

    @field_validator("endpoints")
    @classmethod
    def _paths(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not p.startswith(("/", "*")) for p in value):
            raise ValueError("endpoint patterns are paths, e.g. '/v1/chat/*'")
        return value

    @field_validator("expires_at")
    @classmethod
    def _future(cls, value: float | None) -> float | None:
        if value is not None and value <= time.time():
            raise ValueError("expires_at must be in the future (unix seconds)")
        return value


def check_budget(fields: dict[str, Any]) -> str | None:
    """A budget needs a period and a period needs a budget; None when consistent."""
    has_budget = fields.get("budget_usd") is not None or fields.get("budget_tokens") is not None
    if has_budget and not fields.get("budget_period"):
        return "budget_period"
    if fields.get("budget_period") and not has_budget:
        return "budget_usd"
    return None
