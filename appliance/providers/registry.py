"""Provider instances from backend settings."""

from __future__ import annotations

from appliance.common.config import BackendSettings
from appliance.providers.anthropic import AnthropicProvider
from appliance.providers.base import Provider
from appliance.providers.ollama import OllamaProvider
from appliance.providers.openai_compat import OpenAICompatProvider
from appliance.providers.transport import Transport


def build(settings: BackendSettings, transport: Transport, kind: str | None = None) -> Provider:
    if settings.type == "ollama":
        return OllamaProvider(settings, transport)
    if settings.type == "anthropic":
        return AnthropicProvider(settings, transport)
    return OpenAICompatProvider(settings, transport, kind or "openai")
