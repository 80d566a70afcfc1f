"""Images for models without vision: finding image parts, the key a description is cached by, the rewrite."""

import base64
import hashlib

import pytest

from appliance.common.errors import GatewayError
from appliance.core import vision
from appliance.core.catalog import Route
from appliance.providers.base import Reply

PNG = b"\x89PNG\r\n\x1a\n fake image bytes"
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def image(url: str = DATA_URL) -> dict:
    return {"type": "image_url", "image_url": {"url": url, "detail": "low"}}


def test_image_parts_are_found_in_any_message_and_plain_text_has_none():
    assert not vision.has_images([{"role": "user", "content": "hi"}])
    assert not vision.has_images([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert not vision.has_images("not a list")
    assert vision.has_images([{"role": "user", "content": "hi"}, {"role": "user", "content": [image()]}])
    found = list(vision.image_urls([{"role": "user", "content": [image(), image("https://x/cat.png")]}]))
    assert found == [(0, DATA_URL), (0, "https://x/cat.png")]


def test_the_key_of_a_data_url_is_its_bytes_however_they_are_written():
    expected = hashlib.sha256(PNG).hexdigest()
    assert vision.image_key(DATA_URL) == expected
    assert vision.image_key("data:image/jpeg;base64," + base64.b64encode(PNG).decode()) == expected  # type aside
    percent = "data:image/png," + "".join(f"%{b:02x}" for b in PNG)
    assert vision.image_key(percent) == expected


def test_the_key_of_a_url_is_the_url_itself_never_fetched():
    url = "https://example.com/cat.png"
    assert vision.image_key(url) == hashlib.sha256(url.encode()).hexdigest()
    assert vision.image_key(url) != vision.image_key(url + "?v=2")


@pytest.mark.parametrize("url", ["data:image/png;base64,@@@=", "data:image/png;base64"])
def test_a_broken_data_url_is_a_400_naming_the_message(url):
    with pytest.raises(GatewayError) as caught:
        vision.image_key(url, 3)
    assert caught.value.status == 400 and caught.value.param == "messages.[3].content"


def test_a_part_without_a_url_is_a_400():
    with pytest.raises(GatewayError) as caught:
        list(vision.image_urls([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]))
    assert caught.value.param == "messages.[0].content"


def test_image_parts_become_their_descriptions():
    messages = [{"role": "system", "content": "S"},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image()]}]
    out = vision.described(messages, {DATA_URL: "A red square."})
    assert out == [{"role": "system", "content": "S"},
                   {"role": "user", "content": "What is this?\n[Image: A red square.]"}]
    assert messages[1]["content"][1]["type"] == "image_url"  # the request's own messages are not modified


def test_parts_other_than_text_stay_parts():
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    out = vision.described([{"role": "user", "content": [image(), audio]}], {DATA_URL: "A cat."})
    assert out == [{"role": "user", "content": [{"type": "text", "text": "[Image: A cat.]"}, audio]}]


def test_without_a_describer_the_501_says_so():
    error = vision.no_describer(Route("tiny", "llamacpp", "tiny"))
    assert (error.status, error.code, error.param) == (501, "unsupported", "messages")
    assert "takes no images" in error.message and "[vision] describer" in error.message


def test_a_describer_answer_gives_text_and_tokens():
    route = Route("llava", "fake", "llava")
    answer = {"choices": [{"message": {"content": " A dog. "}}],
              "usage": {"prompt_tokens": 700, "completion_tokens": 4}}
    text, spent = vision._answer(route, Reply(b"", answer, 0.5))
    assert text == "A dog." and spent.tokens.prompt == 700 and spent.tokens.completion == 4
    with pytest.raises(ValueError):
        vision._answer(route, Reply(b"", {"choices": [{"message": {"content": ""}}]}, 0.1))
