"""Where system text goes, per backend and model: the one rule (common/system_messages.py)."""

import pytest

from appliance.common import system_messages
from appliance.common.config import ModelSettings
from appliance.common.errors import GatewayError
from appliance.core.catalog import Catalog, Route
from appliance.providers.anthropic_translate import messages_request
from appliance.providers.base import ModelInfo


def user(content):
    return {"role": "user", "content": content}


def test_placement_per_backend_kind_and_flag():
    assert system_messages.placement("anthropic", None) == "top_level"
    assert system_messages.placement("anthropic", False) == "top_level"  # Anthropic has a field for it
    assert system_messages.placement("llamacpp", False) == "merged"
    assert system_messages.placement("vllm", True) == "messages"
    assert system_messages.placement("ollama", None) == "messages"


def test_system_text_leads_the_first_user_message_after_a_blank_line():
    out = system_messages.merged([{"role": "system", "content": "Be brief."}, user("Hi")])
    assert out == [user("Be brief.\n\nHi")]


def test_several_system_and_developer_messages_are_joined_in_order():
    messages = [{"role": "system", "content": "A"}, {"role": "developer", "content": [{"type": "text", "text": "B"}]},
                user("Hi"), {"role": "assistant", "content": "Hello"}, {"role": "system", "content": "C"},
                user("Again")]
    out = system_messages.merged(messages)
    assert out == [user("A\nB\nC\n\nHi"), {"role": "assistant", "content": "Hello"}, user("Again")]
    assert messages[0] == {"role": "system", "content": "A"}  # the request's own messages are not modified


def test_parts_content_gets_the_system_text_in_its_first_text_part():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    out = system_messages.merged([{"role": "system", "content": "S"}, user([{"type": "text", "text": "Look"}, image])])
    assert out == [user([{"type": "text", "text": "S\n\nLook"}, image])]
    out = system_messages.merged([{"role": "system", "content": "S"}, user([image])])
    assert out == [user([{"type": "text", "text": "S\n\n"}, image])]


def test_no_user_message_makes_the_system_text_one():
    out = system_messages.merged([{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}])
    assert out == [user("S"), {"role": "assistant", "content": "A"}]


def test_empty_system_messages_go_and_add_nothing():
    assert system_messages.merged([{"role": "system", "content": ""}, user("Hi")]) == [user("Hi")]


def test_a_system_message_with_an_image_part_is_refused_naming_it():
    with pytest.raises(GatewayError) as caught:
        system_messages.merged([user("Hi"), {"role": "system", "content": [{"type": "image_url"}]}])
    assert caught.value.param == "messages.[1].content"


def test_anthropic_translation_hoists_the_same_text():
    body = {"model": "m", "messages": [{"role": "system", "content": "A"}, {"role": "developer", "content": "B"},
                                       user("Hi")]}
    text, _ = system_messages.split(body["messages"])
    assert messages_request(body)["system"] == text == "A\nB"


def catalog(*entries: ModelSettings) -> Catalog:
    c = Catalog(list(entries))
    c.add_backend("local", "llamacpp")
    c.update("local", models=[ModelInfo(id="tiny.gguf", aliases=("tiny",)), ModelInfo(id="other")])
    return c


def test_the_flag_follows_the_entry_name_and_its_targets():
    c = catalog(ModelSettings(name="tiny", system_role=False),
                ModelSettings(name="chat", targets=["local/other"], system_role=False))
    assert c.said(Route("tiny", "local", "tiny.gguf"), "system_role") is False  # named by an alias of the model
    assert c.said(Route("chat", "local", "other"), "system_role") is False  # a target of the entry
    assert c.said(Route("x", "elsewhere", "other"), "system_role") is None  # the same name on another backend
    assert catalog().said(Route("tiny", "local", "tiny.gguf"), "system_role") is None


def test_vision_sugar_is_a_capability_and_the_backends_word_is_the_default():
    c = catalog(ModelSettings(name="tiny", vision=True))
    assert ModelSettings(name="tiny", vision=True).capabilities == {"vision": True}
    assert c.vision(Route("tiny", "local", "tiny.gguf")) is True
    c.update("local", models=[ModelInfo(id="other", capabilities={"vision": False})])
    assert c.vision(Route("other", "local", "other")) is False
    assert catalog().vision(Route("other", "local", "other")) is None  # unknown: images pass through
    with pytest.raises(ValueError, match="disagree"):
        ModelSettings(name="x", vision=True, capabilities={"vision": False})
