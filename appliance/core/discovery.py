"""Zero-config: find model servers on local ports and tell the kinds apart."""

from __future__ import annotations

import asyncio
import logging

import orjson

from appliance.common.config import BackendSettings
from appliance.providers.openai_compat import kind_from_owner
from appliance.providers.transport import Limits, Transport, TransportError

log = logging.getLogger("appliance.core.discovery")

_PROBE = Limits(total_s=2.0, connect_s=0.5)
# LM Studio and SGLang are recognised by their well-known ports when their model list does not say.
_PORT_KINDS = {1234: "lmstudio", 30000: "sglang", 8080: "llamacpp", 9931: "llamacpp"}


async def fingerprint(transport: Transport, host: str, port: int) -> str | None:
    """The kind of server on host:port, or None when nothing usable answers."""
    base = f"http://{host}:{port}"
    try:
        root = await transport.request("GET", base + "/", limits=_PROBE)
    except TransportError:
        return None
    if root.status == 200 and root.body.startswith(b"Ollama is running"):
        return "ollama"
    try:
        listing = await transport.request("GET", base + "/v1/models", limits=_PROBE)
        data = orjson.loads(listing.body) if listing.status == 200 else None
    except (TransportError, orjson.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        return None
    owner = next((m.get("owned_by") for m in data["data"] if isinstance(m, dict)), None)
    kind = kind_from_owner(owner)
    return _PORT_KINDS.get(port, "openai") if kind == "openai" else kind


def backend_for(kind: str, host: str, port: int, taken: set[str]) -> BackendSettings:
    """Settings for a discovered server, named after its kind (plus the port when that name is taken)."""
    name = kind if kind not in taken else f"{kind}-{port}"
    if kind == "ollama":
        return BackendSettings(name=name, type="ollama", url=f"http://{host}:{port}")
    return BackendSettings(name=name, type="openai", url=f"http://{host}:{port}/v1")


async def scan(transport: Transport, host: str, ports: list[int]) -> dict[int, str]:
    """Probe every port at once; returns port -> kind for those that answered."""
    kinds = await asyncio.gather(*(fingerprint(transport, host, port) for port in ports))
    return {port: kind for port, kind in zip(ports, kinds, strict=True) if kind}
