"""Prompt templates without a server: placeholders, validation, rendering, placement, the worker's cache."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from appliance.common.config import TemplatesSettings
from appliance.common.errors import GatewayError
from appliance.common.resources import migrations_dir
from appliance.core import pipeline, templates
from appliance.storage import templates_repo
from appliance.storage.db import Database
from appliance.storage.migrate import migrate

GREETING = {"messages": [{"role": "system", "content": "You are {{ persona }} at {{company}}."},
                         {"role": "user", "content": [{"type": "text", "text": "Hello from {{company}}"}]}],
            "variables": {"persona": {"default": "a helper", "description": "who"}, "company": {}}}


def version(data: dict[str, Any] = GREETING, number: int = 1) -> templates.Version:
    fields = templates.check_version(data)
    return templates.Version.of({"id": "greet", "version": number, **fields})


def error_of(call: Any, *args: Any, **kwargs: Any) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        call(*args, **kwargs)
    return caught.value


# ------------------------------------------------------------------------------------------ placeholders


def test_placeholders_with_and_without_spaces_are_found() -> None:
    messages = [{"role": "user", "content": "{{a}} {{ b }} {{\tc\t}} {{ d}}"}]
    assert templates.placeholders(messages) == {"a", "b", "c", "d"}


def test_what_is_not_a_name_between_braces_is_text() -> None:
    messages = [{"role": "user", "content": "{{ }} {{1x}} {{a b}} {{a-b}} {x} {{{"}]
    assert templates.placeholders(messages) == set()
    rendered = templates.render(version({"messages": messages}), {})
    assert rendered[0]["content"] == messages[0]["content"]


def test_text_parts_are_scanned_too() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "{{x}}"}, {"type": "text", "text": "{{y}}"}]}]
    assert templates.placeholders(messages) == {"x", "y"}


# ------------------------------------------------------------------------------------------ validation


def test_an_undeclared_placeholder_is_refused_by_name() -> None:
    error = error_of(templates.check_version, {"messages": [{"role": "user", "content": "{{ who }} {{what}}"}],
                                               "variables": {"who": {}}})
    assert (error.status, error.param) == (400, "variables")
    assert "what" in error.message and "who" not in error.message


@pytest.mark.parametrize(("data", "param"), [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages.[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.[0].content.[0]"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "x"}], "variables": []}, "variables"),
    ({"messages": [{"role": "user", "content": "x"}], "variables": {"9lives": {}}}, "variables.9lives"),
    ({"messages": [{"role": "user", "content": "x"}], "variables": {"a": {"default": 1}}}, "variables.a.default"),
    ({"messages": [{"role": "user", "content": "x"}], "variables": {"a": {"kind": "x"}}}, "variables.a"),
    ({"messages": [{"role": "user", "content": "x"}], "description": 5}, "description"),
    ({"messages": [{"role": "user", "content": "x"}], "colour": "red"}, "colour"),
])
def test_bad_fields_are_named(data: dict[str, Any], param: str) -> None:
    error = error_of(templates.check_version, data)
    assert (error.status, error.param) == (400, param)


@pytest.mark.parametrize("value", ["Support", "-x", "", "a" * 65, "a/b", "a b", "x\n", 5])
def test_ids_are_slugs(value: Any) -> None:
    assert error_of(templates.check_id, value).param == "id"


def test_good_ids() -> None:
    for value in ("support", "a", "9", "summarize_v2.1-final", "a" * 64):
        assert templates.check_id(value) == value


# ------------------------------------------------------------------------------------------ rendering


def test_render_substitutes_declared_names_and_defaults() -> None:
    rendered = templates.render(version(), {"company": "ACME"})
    assert rendered == [{"role": "system", "content": "You are a helper at ACME."},
                        {"role": "user", "content": [{"type": "text", "text": "Hello from ACME"}]}]


def test_a_value_is_never_scanned_for_placeholders_again() -> None:
    rendered = templates.render(version(), {"company": "{{persona}}", "persona": "{{ company }} \\1 \\g<0>"})
    assert rendered[0]["content"] == "You are {{ company }} \\1 \\g<0> at {{persona}}."


def test_numbers_are_inserted_as_text() -> None:
    assert templates.render(version(), {"company": 42})[1]["content"][0]["text"] == "Hello from 42"


def test_missing_and_undeclared_variables_are_named() -> None:
    missing = error_of(templates.render, version(), {})
    assert (missing.status, missing.param) == (400, "template.variables") and "company" in missing.message
    undeclared = error_of(templates.render, version(), {"company": "x", "colour": "red", "size": "L"})
    assert undeclared.param == "template.variables" and "colour, size" in undeclared.message


@pytest.mark.parametrize("value", [None, True, ["x"], {"a": 1}])
def test_values_must_be_text_or_numbers(value: Any) -> None:
    assert error_of(templates.render, version(), {"company": value}).param == "template.variables"


@pytest.mark.parametrize(("value", "param"), [
    ("support", "template"), ({"version": 1}, "template.id"), ({"id": "Bad Id"}, "template.id"),
    ({"id": "a", "version": 0}, "template.version"), ({"id": "a", "version": True}, "template.version"),
    ({"id": "a", "version": "2"}, "template.version"), ({"id": "a", "variables": ["x"]}, "template.variables"),
    ({"id": "a", "vars": {}}, "template.vars"),
])
def test_a_requests_template_field_is_checked(value: Any, param: str) -> None:
    assert error_of(templates.use_of, value).param == param


# ------------------------------------------------------------------------------------------ placement


def test_rendered_messages_go_first_with_the_system_messages_at_the_head() -> None:
    rendered = [{"role": "system", "content": "T-sys"}, {"role": "user", "content": "T-user"}]
    own = [{"role": "system", "content": "R-sys"}, {"role": "user", "content": "R-user"}]
    assert [m["content"] for m in templates.combine(rendered, own)] == ["T-sys", "R-sys", "T-user", "R-user"]
    assert templates.combine(rendered, []) == rendered
    no_system = [{"role": "user", "content": "R-user"}]
    assert [m["content"] for m in templates.combine(rendered, no_system)] == ["T-sys", "T-user", "R-user"]


def test_messages_body_takes_system_top_level() -> None:
    rendered = [{"role": "system", "content": "T-sys"}, {"role": "developer", "content": [{"type": "text",
                                                                                           "text": "T-dev"}]},
                {"role": "user", "content": "T-user"}]
    body = {"model": "m", "max_tokens": 5, "template": {"id": "x"}, "system": "R-sys",
            "messages": [{"role": "user", "content": "R-user"}]}
    out = templates.as_messages_body(body, rendered)
    assert "template" not in out
    assert out["system"] == "T-sys\n\nT-dev\n\nR-sys"
    assert out["messages"] == [{"role": "user", "content": "T-user"}, {"role": "user", "content": "R-user"}]
    blocks = templates.as_messages_body({**body, "system": [{"type": "text", "text": "R", "cache_control": {}}]},
                                        rendered)
    assert blocks["system"] == [{"type": "text", "text": "T-sys"}, {"type": "text", "text": "T-dev"},
                                {"type": "text", "text": "R", "cache_control": {}}]
    bare = templates.as_messages_body({"model": "m", "template": {}}, rendered)
    assert bare["system"] == "T-sys\n\nT-dev" and bare["messages"] == [{"role": "user", "content": "T-user"}]
    for wrong in ({"system": 5}, {"messages": "hi"}):  # left for the translation to refuse, by name
        assert templates.as_messages_body({**body, **wrong}, rendered).items() >= wrong.items()


def test_a_chat_body_with_a_template_may_leave_out_messages() -> None:
    for body in ({"model": "m", "template": {"id": "x"}}, {"model": "m", "messages": [], "template": {"id": "x"}}):
        pipeline.validate("chat/completions", body)
    assert error_of(pipeline.validate, "chat/completions", {"model": "m"}).param == "messages"
    assert error_of(pipeline.validate, "chat/completions", {"model": "m", "messages": []}).param == "messages"
    assert error_of(pipeline.validate, "chat/completions",
                    {"model": "m", "messages": "hi", "template": {"id": "x"}}).param == "messages"


def test_template_never_reaches_a_backend() -> None:
    assert "template" in pipeline.GATEWAY_FIELDS


# ------------------------------------------------------------------------------------------ the worker's cache


class CountingDatabase(Database):
    """A Database that counts its reads."""

    reads = 0

    async def fetchall(self, sql: str, params: Any = ()) -> Any:
        self.reads += 1
        return await super().fetchall(sql, params)


async def _library_run(path: Path) -> None:
    migrate(path, migrations_dir())
    opened = await Database.open(path)
    db = CountingDatabase(path, opened._reader, opened._writer)
    try:
        await templates.create(db, {"id": "greet", **GREETING})
        library = templates.Library(db, TemplatesSettings())
        db.reads = 0
        first = await library.version("greet", None)
        assert (first.number, db.reads) == (1, 1)
        for _ in range(5):
            assert await library.version("greet", None) is first
            assert await library.version("greet", 1) is first  # the latest also serves its number
        assert db.reads == 1
        await templates_repo.add_version(db, "greet", templates.check_version(GREETING))
        assert (await library.version("greet", None)).number == 1  # "latest" is trusted for cache_ttl_s
        assert (await library.version("greet", 2)).number == 2
        library.forget("greet")
        assert (await library.version("greet", None)).number == 2
        with pytest.raises(GatewayError) as unknown:
            await library.version("nope", None)
        assert (unknown.value.status, unknown.value.code, unknown.value.param) == (404, "not_found", "template.id")
        with pytest.raises(GatewayError) as no_version:
            await library.version("greet", 7)
        assert (no_version.value.status, no_version.value.param) == (404, "template.version")
    finally:
        await db.close()


def test_the_library_reads_sqlite_once_per_version(tmp_path: Path) -> None:
    asyncio.run(_library_run(tmp_path / "appliance.db"))


async def _admin_run(path: Path) -> None:
    migrate(path, migrations_dir())
    db = await Database.open(path)
    try:
        created = await templates.create(db, {"id": "greet", **GREETING})
        assert (created["version"], created["latest_version"], created["object"]) == (1, 1, "template.version")
        with pytest.raises(GatewayError) as taken:
            await templates.create(db, {"id": "greet", **GREETING})
        assert (taken.value.status, taken.value.param) == (409, "id")
        added = await templates.add_version(db, "greet", {**GREETING, "description": "second"})
        assert (added["version"], added["description"]) == (2, "second")
        listed = await templates.list_templates(db)
        assert [(t["id"], t["latest_version"], t["description"]) for t in listed] == [("greet", 2, "second")]
        assert [v["version"] for v in await templates.versions(db, "greet")] == [1, 2]
        assert (await templates.get(db, "greet", 1))["latest_version"] == 2
        assert (await templates.delete(db, "greet"))["versions"] == 2
        assert await templates.list_templates(db) == []
        with pytest.raises(GatewayError) as gone:
            await templates.get(db, "greet")
        assert gone.value.status == 404
        again = await templates.create(db, {"id": "greet", **GREETING})  # the id is free again, from version 1
        assert again["version"] == 1
    finally:
        await db.close()


def test_admin_operations(tmp_path: Path) -> None:
    asyncio.run(_admin_run(tmp_path / "appliance.db"))
