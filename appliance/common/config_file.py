"""Reading the config: a TOML file, the environment and the command line into one validated Settings.

Precedence, lowest first: built-in defaults, the TOML file, APPLIANCE_* environment variables,
command-line flags. A relative ``data_dir`` in a file resolves against the file's folder. Errors name the
key and, where the file has it, its line. What a reload may change and what needs a restart is decided here.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from appliance.common.config import ConfigError, Settings

# ------------------------------------------------------------------------------------------ loading

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, where: str, environ: dict[str, str]) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string value."""
    if isinstance(value, str):
        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in environ:
                return environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{where}: environment variable {name} is not set")

        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{where}.{k}" if where else k, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{where}[{i}]", environ) for i, v in enumerate(value)]
    return value


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe(error: ValidationError, where: str, text: str | None) -> str:
    """One line per problem: ``file:line: key: message`` (the line when the file is known and names it)."""
    lines = []
    for e in error.errors():
        loc = _key_path(tuple(p for p in e["loc"] if p not in ("function-after",)))
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        msg = msg.removeprefix("Value error, ")
        lines.append(_at(where, text, loc, f"{loc}: {msg}" if not msg.startswith(loc) else msg))
    return "; ".join(lines)


def _at(where: str, text: str | None, key: str, message: str) -> str:
    line = line_of(text, key) if text is not None else None
    return f"{where}:{line}: {message}" if line is not None else f"{where}: {message}"


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\[\]#]+?)\s*\]\]?\s*(?:#.*)?$")
_ASSIGN = re.compile(r"^\s*\"?([A-Za-z0-9_-]+)\"?\s*=")


def line_of(text: str, key: str) -> int | None:
    """The line (1-based) of a TOML ``text`` that sets ``key`` (``models[1].target``, ``routing.retries``);
    the header of its table when the key itself is not written (a missing field); None when neither is.

    For the config files people write (tables and arrays of tables, one key per line); an inline table
    or a dotted key only finds its table.
    """
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", key)
    if not parts:
        return None
    table, index, rest = None, None, parts
    if len(parts) > 1:
        table, rest = parts[0], parts[1:]
        if rest and rest[0].startswith("["):
            index, rest = int(rest[0][1:-1]), rest[1:]
    current: str | None = None
    seen: dict[str, int] = {}
    header_line = None
    inside = table is None
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            current = header.group(2).strip()
            seen[current] = seen.get(current, -1) + 1
            inside = current == table and (index is None or seen[current] == index)
            if inside:
                header_line = number
            continue
        assign = _ASSIGN.match(line)
        if inside and assign and rest and assign.group(1) == rest[0]:
            return number
    return header_line


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None


def read_file(path: Path, environ: dict[str, str], text: str | None = None) -> dict[str, Any]:
    """The file's settings, ${VAR} resolved; ``text``: its content as already read."""
    if text is None:
        text = read_text(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        at = re.search(r"\(at line (\d+)", str(exc))
        raise ConfigError(f"{path}{':' + at.group(1) if at else ''}: not valid TOML: {exc}") from None
    try:
        data = _interpolate(raw, "", environ)
    except ConfigError as exc:
        key = str(exc).split(":", 1)[0]
        raise ConfigError(_at(str(path), text, key, str(exc))) from None
    data_dir = data.get("server", {}).get("data_dir") if isinstance(data.get("server"), dict) else None
    if isinstance(data_dir, str) and not Path(data_dir).is_absolute():
        data["server"]["data_dir"] = str((path.parent / data_dir).resolve())
    guard = data.get("guardrails")
    schema = guard.get("schema_validation") if isinstance(guard, dict) else None
    if isinstance(schema, dict) and isinstance(schema.get("schema"), str) and not Path(schema["schema"]).is_absolute():
        schema["schema"] = str((path.parent / schema["schema"]).resolve())  # a schema file beside the config
    return data


# What a running appliance cannot take without a restart: the listener, the workers and the data dir, the
# shared tables' geometry (limits, breaker buckets), the key cache, the batch runner's own copy, and the
# size of each worker's memory cache. A reload keeps their running values.
RESTART_ONLY = ("server", "limits", "auth", "batches", "state", "database", "files.dir", "routing.breaker_window_s",
                "cache.memory_entries")


def restart_only_changes(running: Settings, new: Settings) -> list[str]:
    """The keys under RESTART_ONLY whose values differ (``server.port``, ``limits.window_s``, ...)."""
    changed = []
    for entry in RESTART_ONLY:
        section, _, key = entry.partition(".")
        old_part, new_part = getattr(running, section), getattr(new, section)
        names = [key] if key else list(type(old_part).model_fields)
        changed += [f"{section}.{name}" for name in names if getattr(old_part, name) != getattr(new_part, name)]
    return changed


def keep_restart_only(running: Settings, new: Settings) -> Settings:
    """``new``, with every RESTART_ONLY value as it runs."""
    update: dict[str, Any] = {}
    for entry in RESTART_ONLY:
        section, _, key = entry.partition(".")
        if not key:
            update[section] = getattr(running, section)
        else:
            part = update.get(section, getattr(new, section))
            update[section] = part.model_copy(update={key: getattr(getattr(running, section), key)})
    return new.model_copy(update=update)


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    text: str | None = None,
) -> Settings:
    """Build Settings from a file (or APPLIANCE_CONFIG), APPLIANCE_* variables and CLI overrides.

    ``overrides`` maps section -> {key: value}; values that are None are ignored. ``text``: the file's
    content, already read (the file is then not opened).
    """
    environ = dict(os.environ if environ is None else environ)
    path_text = config_file or environ.get("APPLIANCE_CONFIG") or None
    path = Path(path_text).resolve() if path_text else None
    if path is not None and text is None:
        text = read_text(path)
    data = read_file(path, environ, text) if path else {}
    if environ.get("APPLIANCE_DATA_DIR"):
        data.setdefault("server", {})["data_dir"] = environ["APPLIANCE_DATA_DIR"]
    for section, values in (overrides or {}).items():
        for key, value in values.items():
            if value is not None:
                data.setdefault(section, {})[key] = value
    data["config_file"] = str(path) if path else None
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, str(path or "settings"), text)) from None
    # Anchor a relative data dir once, so workers and the CLI agree whatever their cwd.
    server = settings.server.model_copy(update={"data_dir": settings.server.data_dir.resolve()})
    return settings.model_copy(update={"server": server})
