"""The README documents every config key and every route (as datasette's test_docs does)."""

import re
from pathlib import Path

from appliance.common.config import Settings
from appliance.common.paths import canonical

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_config_key_is_documented():
    missing = []
    for section, field in Settings.model_fields.items():
        if section == "config_file":
            continue
        model = field.annotation.__args__[0] if section in ("backends", "models") else field.annotation
        header = f"[[{section}]]" if section in ("backends", "models") else f"[{section}]"
        if f"### `{header}`" not in README:
            missing.append(header)
        missing += [f"{section}.{key}" for key in model.model_fields if f"`{key}`" not in README]
    assert not missing, f"undocumented config keys: {missing}"


def test_every_route_is_documented():
    from appliance.common.config_file import load_settings
    from appliance.server.app import create_app

    app = create_app(load_settings(environ={}))
    try:
        paths = {route.path for route in app.router.routes}
    finally:
        app.__class__._app_registry.pop(app.name, None)
    # Every /api/v1/x route is /v1/x again (README: "Every /v1 route under /api/v1 too"): its /v1 entry covers it.
    documented = {canonical(re.sub(r"<(\w+)(:\w+)?>", r"{\1}", f"/{p}")) for p in paths
                  if p and not p.startswith("static")}
    missing = [p for p in documented if f"{p}`" not in README]
    assert not missing, f"undocumented routes: {missing}"
    assert "### `/api/v1/...`" in README
