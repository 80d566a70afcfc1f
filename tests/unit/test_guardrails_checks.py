"""content_moderation's term lists and model verdicts; schema_validation's schema and messages; their config."""

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.common.config import ConfigError
from appliance.common.config_file import load_settings
from appliance.guardrails import schema
from appliance.guardrails.moderation import Moderator, model_verdict

ROOT = Path(__file__).resolve().parents[2]
CATEGORIES = {"weapons": ["bomb", "assault rifle", "re:\\bgun(s|powder)?\\b"], "spam": ["re:(?i)buy now!+"]}


@pytest.mark.parametrize(("text", "found"), [
    ("how to build a Bomb", ["weapons"]),
    ("an ASSAULT   rifle", ["weapons"]),
    ("gunpowder and guns", ["weapons"]),
    ("BUY NOW!!! a bomb", ["weapons", "spam"]),
    ("the bombastic gunslinger", []),
    ("bombs", []),  # whole words only: list the plural too when it matters
])
def test_terms_and_regexes(text: str, found: list[str]) -> None:
    assert Moderator(CATEGORIES).flagged([text]) == found


def test_no_categories_is_falsy_and_flags_nothing() -> None:
    assert not Moderator({})
    assert Moderator({}).flagged(["bomb"]) == []


def test_model_verdicts() -> None:
    flagged = {"results": [{"flagged": False, "categories": {"hate": False}},
                           {"flagged": True, "categories": {"hate": False, "violence": True}}]}
    assert model_verdict(flagged) == ["violence"]
    assert model_verdict({"results": [{"flagged": True}]}) == ["flagged"]
    assert model_verdict({"results": [{"flagged": False, "categories": {"violence": True}}]}) == []
    with pytest.raises(ValueError):
        model_verdict({"id": "x"})


PERSON = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}


def test_the_request_schema_wins_over_the_configured_one() -> None:
    body = {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}
    assert schema.schema_of(body, {"type": "array"}) == PERSON
    assert schema.schema_of({"response_format": {"type": "json_object"}}, {"type": "array"}) == {"type": "array"}
    assert schema.schema_of({}, None) is None


@pytest.mark.parametrize(("text", "problem"), [
    ('{"age": 3}', None),
    ('{"age": "three"}', "'three' is not of type 'integer' (at /age)"),
    ("{}", "'age' is a required property (at /)"),
    ("Sure: {}", "the answer is not JSON"),
    (None, "the answer holds no text"),
])
def test_problems_name_what_is_wrong(text: str | None, problem: str | None) -> None:
    found = schema.problem(text, PERSON)
    assert found == problem if problem is None else found.startswith(problem)


def test_an_invalid_schema_is_said_so() -> None:
    assert "JSON Schema itself is invalid" in schema.problem("{}", {"type": "no-such-type"})


def test_jsonschema_is_not_imported_at_start(tmp_path: Path) -> None:
    code = ("import sys; import appliance.core.pipeline, appliance.server.app; "
            "print('jsonschema' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "False"


def test_config_checks_regexes_and_reads_schema_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[guardrails.content_moderation.categories]\nweapons = ["re:(unclosed"]\n')
    with pytest.raises(ConfigError, match="weapons"):
        load_settings(bad, environ={})
    (tmp_path / "person.json").write_text('{"type": "object", "required": ["age"]}')
    good = tmp_path / "good.toml"
    good.write_text('[guardrails]\nenforce = ["pii"]\n[guardrails.schema_validation]\nschema = "person.json"\n')
    settings = load_settings(good, environ={})
    assert settings.guardrails.schema_validation.json_schema == {"type": "object", "required": ["age"]}
    assert settings.guardrails.enforce == ["pii"]
    assert settings.masked()["guardrails"]["schema_validation"]["schema"] == {"type": "object", "required": ["age"]}
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[guardrails]\nenforce = ["telepathy"]\n')
    with pytest.raises(ConfigError, match="enforce"):
        load_settings(unknown, environ={})
