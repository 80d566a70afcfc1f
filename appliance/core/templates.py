"""Prompt templates: validation, rendering, and each worker's cache of the versions requests use.

A template is an id and immutable, numbered versions; a version is chat messages whose text may hold
``{{name}}`` placeholders (``{{ name }}`` too) and the variables they may name, each with an optional
default. Rendering is one pass of plain substitution over the stored text: a value is inserted as text, never
scanned for placeholders again, never evaluated. A placeholder that is not declared cannot exist: creating a
version that holds one is refused, so anything else between ``{{`` and ``}}`` is plain text.

The admin API and the CLI share the operations at the bottom (create, add a version, get, list, delete).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cachetools import TTLCache

from appliance.common.config import TemplatesSettings
from appliance.common.errors import GatewayError
from appliance.storage import templates_repo
from appliance.storage.db import Database

ID = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]{0,63})\s*\}\}")
ROLES = ("system", "developer", "user", "assistant")
SYSTEM_ROLES = frozenset(("system", "developer"))
MAX_DESCRIPTION = 2000
_VERSION_FIELDS = ("messages", "variables", "description")
_MESSAGE_FIELDS = frozenset(("role", "content", "name"))
_VARIABLE_FIELDS = frozenset(("default", "description"))
_USE_FIELDS = frozenset(("id", "version", "variables"))


# ------------------------------------------------------------------------------------------ versions


def check_id(value: Any, param: str = "id") -> str:
    if value is None:
        raise GatewayError("missing_field", f"Missing required parameter: '{param}'.", param=param)
    if not isinstance(value, str) or not ID.fullmatch(value):
        raise GatewayError("invalid_value", f"'{param}' must be a slug: lower-case letters, digits, '_', '.' and "
                           "'-', starting with a letter or digit, at most 64 characters.", param=param)
    return value


def check_version(data: Any, *, allowed: tuple[str, ...] = _VERSION_FIELDS) -> dict[str, Any]:
    """A version's fields (messages, variables, description) as sent to the admin API, checked; 400 naming
    the field at fault, and any placeholder the messages use without declaring it."""
    if not isinstance(data, dict):
        raise GatewayError("invalid_value", "The request body must be a JSON object.")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise GatewayError("invalid_value", f"Unknown field(s): {', '.join(unknown)}.", param=unknown[0])
    messages = _messages(data.get("messages"))
    variables = _variables(data.get("variables"))
    description = data.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > MAX_DESCRIPTION):
        raise GatewayError("invalid_value", f"'description' must be a string of at most {MAX_DESCRIPTION} "
                           "characters.", param="description")
    undeclared = sorted(placeholders(messages) - variables.keys())
    if undeclared:
        raise GatewayError("invalid_value", "The messages use undeclared variable(s): "
                           f"{', '.join(undeclared)}; declare them in 'variables'.", param="variables")
    return {"messages": messages, "variables": variables, "description": description}


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        raise GatewayError("missing_field", "Missing required parameter: 'messages'.", param="messages")
    if not isinstance(value, list) or not value:
        raise GatewayError("invalid_value", "'messages' must be a non-empty array.", param="messages")
    for i, message in enumerate(value):
        at = f"messages.[{i}]"
        if not isinstance(message, dict):
            raise GatewayError("invalid_value", f"{at} must be an object with a 'role' and 'content'.", param=at)
        unknown = sorted(set(message) - _MESSAGE_FIELDS)
        if unknown:
            raise GatewayError("invalid_value", f"{at} has unknown field(s): {', '.join(unknown)}.",
                               param=f"{at}.{unknown[0]}")
        if message.get("role") not in ROLES:
            raise GatewayError("invalid_value", f"{at}.role must be one of {', '.join(ROLES)}.", param=f"{at}.role")
        if "name" in message and not isinstance(message["name"], str):
            raise GatewayError("invalid_value", f"{at}.name must be a string.", param=f"{at}.name")
        _content(message.get("content"), f"{at}.content")
    return value


def _content(content: Any, at: str) -> None:
    """A string, or a non-empty list of text parts (templates hold text only)."""
    if isinstance(content, str):
        return
    if isinstance(content, list) and content:
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.keys() == {"type", "text"} and part["type"] == "text"
                    and isinstance(part["text"], str)):
                raise GatewayError("invalid_value", f"{at}.[{j}] must be a text part: "
                                   '{"type": "text", "text": "..."}.', param=f"{at}.[{j}]")
        return
    raise GatewayError("invalid_value", f"{at} must be a string or a non-empty array of text parts.", param=at)


def _variables(value: Any) -> dict[str, dict[str, str]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise GatewayError("invalid_value", "'variables' must be an object: name -> {\"default\", "
                           "\"description\"}.", param="variables")
    out = {}
    for name, spec in value.items():
        at = f"variables.{name}"
        if not NAME.fullmatch(name):
            raise GatewayError("invalid_value", f"Variable name {name!r} must be a letter or '_' followed by "
                               "letters, digits or '_' (at most 64).", param=at)
        spec = {} if spec is None else spec
        if not isinstance(spec, dict) or not set(spec) <= _VARIABLE_FIELDS:
            raise GatewayError("invalid_value", f"{at} must be an object with an optional 'default' and "
                               "'description'.", param=at)
        for field in _VARIABLE_FIELDS:
            if field in spec and not isinstance(spec[field], str):
                raise GatewayError("invalid_value", f"{at}.{field} must be a string.", param=f"{at}.{field}")
        out[name] = dict(spec)
    return out


def texts(messages: list[dict[str, Any]]) -> list[str]:
    """Every text a template's messages hold, in order."""
    out = []
    for message in messages:
        content = message["content"]
        out += [content] if isinstance(content, str) else [part["text"] for part in content]
    return out


def placeholders(messages: list[dict[str, Any]]) -> set[str]:
    return {name for text in texts(messages) for name in PLACEHOLDER.findall(text)}


# ------------------------------------------------------------------------------------------ rendering


@dataclass(frozen=True, slots=True)
class Version:
    """One stored version, ready to render."""

    id: str
    number: int
    messages: list[dict[str, Any]]
    defaults: dict[str, str]
    required: frozenset[str]

    @classmethod
    def of(cls, row: dict[str, Any]) -> Version:
        variables = row["variables"]
        defaults = {name: spec["default"] for name, spec in variables.items() if "default" in spec}
        return cls(row["id"], int(row["version"]), row["messages"], defaults, frozenset(variables) - defaults.keys())

    @property
    def ref(self) -> str:
        return f"{self.id}@{self.number}"


@dataclass(frozen=True, slots=True)
class Use:
    """A request's ``template`` field: which template, which version (None: the latest), its values."""

    id: str
    version: int | None
    variables: dict[str, Any]


def use_of(value: Any) -> Use:
    """The request's ``template`` field, checked; 400 naming the part at fault."""
    if not isinstance(value, dict):
        raise GatewayError("invalid_value", "'template' must be an object: {\"id\", \"version\", \"variables\"}.",
                           param="template")
    unknown = sorted(set(value) - _USE_FIELDS)
    if unknown:
        raise GatewayError("invalid_value", f"'template' has unknown field(s): {', '.join(unknown)}.",
                           param=f"template.{unknown[0]}")
    template_id = check_id(value.get("id"), "template.id")
    version = value.get("version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
        raise GatewayError("invalid_value", "'template.version' must be a positive integer.", param="template.version")
    variables = value.get("variables")
    if variables is None:
        variables = {}
    if not isinstance(variables, dict):
        raise GatewayError("invalid_value", "'template.variables' must be an object of names and values.",
                           param="template.variables")
    return Use(template_id, version, variables)


def values_for(version: Version, given: dict[str, Any]) -> dict[str, str]:
    """The text each declared variable takes: the value given, else its default; 400 naming any missing
    (required, not given) or undeclared (given, unknown to this version) variable."""
    undeclared = sorted(given.keys() - version.required - version.defaults.keys())
    if undeclared:
        raise GatewayError("invalid_value", f"Template {version.ref} does not declare variable(s): "
                           f"{', '.join(undeclared)}.", param="template.variables")
    missing = sorted(version.required - given.keys())
    if missing:
        raise GatewayError("missing_field", f"Template {version.ref} needs variable(s): {', '.join(missing)}.",
                           param="template.variables")
    values = dict(version.defaults)
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise GatewayError("invalid_value", f"Template variable {name!r} must be a string or a number.",
                               param="template.variables")
        values[name] = value if isinstance(value, str) else str(value)
    return values


def render(version: Version, given: dict[str, Any]) -> list[dict[str, Any]]:
    """The version's messages with each placeholder replaced by its variable's text, in one pass."""
    values = values_for(version, given)

    def fill(match: re.Match[str]) -> str:
        return values[match.group(1)]  # re.sub never scans what this returns: a value is inserted as is

    out = []
    for message in version.messages:
        content = message["content"]
        if isinstance(content, str):
            content = PLACEHOLDER.sub(fill, content)
        else:
            content = [{"type": "text", "text": PLACEHOLDER.sub(fill, part["text"])} for part in content]
        out.append({**message, "content": content})
    return out


def _leading_system(messages: list[Any]) -> int:
    n = 0
    for message in messages:
        if not (isinstance(message, dict) and message.get("role") in SYSTEM_ROLES):
            break
        n += 1
    return n


def combine(rendered: list[dict[str, Any]], own: list[Any]) -> list[Any]:
    """The rendered messages first, the request's own after; but the request's leading system (and developer)
    messages join the template's leading ones at the head, since many chat templates refuse a system message
    anywhere else."""
    k, j = _leading_system(rendered), _leading_system(own)
    return [*rendered[:k], *own[:j], *rendered[k:], *own[j:]]


def as_messages_body(body: dict[str, Any], rendered: list[dict[str, Any]]) -> dict[str, Any]:
    """An Anthropic Messages body with the rendered messages in front: system and developer texts ahead of
    the top-level ``system``, the others ahead of ``messages`` (``template`` itself removed)."""
    system = [_text(m["content"]) for m in rendered if m["role"] in SYSTEM_ROLES]
    turns = [{"role": m["role"], "content": m["content"]} for m in rendered if m["role"] not in SYSTEM_ROLES]
    out = {k: v for k, v in body.items() if k != "template"}
    own = body.get("messages")
    if own is None or isinstance(own, list):  # anything else stays, for the translation to refuse by name
        out["messages"] = [*turns, *(own or ())]
    given = body.get("system")
    if not system or not (given is None or isinstance(given, str | list)):
        return out
    if isinstance(given, list):  # text blocks: the client's stay blocks (with any cache_control)
        out["system"] = [*({"type": "text", "text": text} for text in system), *given]
    else:
        out["system"] = "\n\n".join([*system, *([given] if given else [])])
    return out


def _text(content: str | list[dict[str, str]]) -> str:
    return content if isinstance(content, str) else "\n".join(part["text"] for part in content)


# ------------------------------------------------------------------------------------------ lookup


class Library:
    """One worker's view of the stored templates: a request's lookup is a dict lookup, SQLite only on a miss.

    Numbered versions never change, so they stay for ``version_ttl_s`` (only a delete can make one stale);
    "the latest of an id" can change with every new version, so it stays ``cache_ttl_s``. The worker that
    changes a template forgets it at once; the others within those bounds.
    """

    def __init__(self, db: Database, settings: TemplatesSettings) -> None:
        self._db = db
        self._latest: TTLCache[str, Version] = TTLCache(settings.cache_entries, settings.cache_ttl_s)
        self._numbered: TTLCache[tuple[str, int], Version] = TTLCache(settings.cache_entries, settings.version_ttl_s)

    async def version(self, template_id: str, number: int | None) -> Version:
        found = self._latest.get(template_id) if number is None else self._numbered.get((template_id, number))
        if found is not None:
            return found
        row = await templates_repo.get_version(self._db, template_id, number)
        if row is None:
            raise await _not_found(self._db, template_id, number, "template.id", "template.version")
        found = Version.of(row)
        if number is None:
            self._latest[template_id] = found
        self._numbered[(template_id, found.number)] = found
        return found

    def forget(self, template_id: str) -> None:
        self._latest.pop(template_id, None)
        for key in [key for key in self._numbered if key[0] == template_id]:
            self._numbered.pop(key, None)


async def rendered_for(library: Library, value: Any) -> tuple[str, list[dict[str, Any]]]:
    """A request's ``template`` field as (``id@version``, its rendered messages); 400 or 404 naming the part."""
    use = use_of(value)
    version = await library.version(use.id, use.version)
    return version.ref, render(version, use.variables)


async def _not_found(db: Database, template_id: str, number: int | None, id_param: str,
                     version_param: str) -> GatewayError:
    if number is not None and await templates_repo.exists(db, template_id):
        return GatewayError("not_found", f"Template {template_id!r} has no version {number}.", param=version_param)
    return GatewayError("not_found", f"No template with id {template_id!r}.", param=id_param)


# ------------------------------------------------------------------------------------------ admin operations
# The same operations behind the admin API and the CLI (which works on the data dir directly).


def version_view(row: dict[str, Any]) -> dict[str, Any]:
    return {"object": "template.version", "id": row["id"], "version": row["version"],
            "latest_version": row["latest_version"], "description": row["description"],
            "messages": row["messages"], "variables": row["variables"], "created_at": int(row["created_at"])}


def summary_view(row: dict[str, Any]) -> dict[str, Any]:
    return {"object": "template", "id": row["id"], "latest_version": row["latest_version"],
            "description": row["description"], "created_at": int(row["created_at"]),
            "updated_at": int(row["updated_at"])}


async def create(db: Database, data: Any) -> dict[str, Any]:
    """A new template from ``{"id", "messages", "variables", "description"}``: its version 1."""
    fields = check_version(data, allowed=("id", *_VERSION_FIELDS))
    template_id = check_id(data.get("id"))
    try:
        await templates_repo.create(db, template_id, fields)
    except templates_repo.Exists:
        raise GatewayError("already_exists", f"A template with id {template_id!r} exists; add a version to it "
                           "instead.", param="id") from None
    return await get(db, template_id)


async def add_version(db: Database, template_id: str, data: Any) -> dict[str, Any]:
    fields = check_version(data)
    try:
        number = await templates_repo.add_version(db, template_id, fields)
    except templates_repo.Missing:
        raise GatewayError("not_found", f"No template with id {template_id!r}.", param="id") from None
    return await get(db, template_id, number)


async def get(db: Database, template_id: str, number: int | None = None) -> dict[str, Any]:
    row = await templates_repo.get_version(db, template_id, number)
    if row is None:
        raise await _not_found(db, template_id, number, "id", "version")
    return version_view(row)


async def versions(db: Database, template_id: str) -> list[dict[str, Any]]:
    rows = await templates_repo.versions(db, template_id)
    if not rows:
        raise GatewayError("not_found", f"No template with id {template_id!r}.", param="id")
    return [version_view(row) for row in rows]


async def list_templates(db: Database) -> list[dict[str, Any]]:
    return [summary_view(row) for row in await templates_repo.list_all(db)]


async def delete(db: Database, template_id: str) -> dict[str, Any]:
    removed = await templates_repo.delete(db, template_id)
    if not removed:
        raise GatewayError("not_found", f"No template with id {template_id!r}.", param="id")
    return {"id": template_id, "object": "template", "deleted": True, "versions": removed}


def version_number(value: str | None) -> int | None:
    """``?version=N`` (or the CLI's --version) as a number; 400 unless a positive integer."""
    if value is None:
        return None
    if not re.fullmatch(r"[0-9]{1,9}", value) or int(value) < 1:
        raise GatewayError("invalid_value", "'version' must be a positive integer.", param="version")
    return int(value)
