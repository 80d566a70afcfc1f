"""The extension endpoints' pieces: capabilities, token counts, the multipart offsets, the upload's replay."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.accounts.usage import Tokens, estimate_prompt, from_extension
from appliance.common import capabilities, multipart
from appliance.common.config import ConfigError
from appliance.common.config_file import load_settings
from appliance.common.errors import GatewayError
from appliance.core import uploads
from appliance.providers.base import CAPABILITY_OF, IMAGE_EDITS, RERANK, SCORE, SPEECH, TRANSLATIONS, serves


def test_capabilities_default_by_kind_and_expand_audio():
    assert serves(capabilities.of(None, "vllm"), RERANK) and serves(capabilities.of(None, "vllm"), TRANSLATIONS)
    assert not serves(capabilities.of(None, "vllm"), SPEECH)
    assert not serves(capabilities.of(None, "openai"), SCORE)  # unknown servers: OpenAI's own endpoints
    assert serves(capabilities.of(None, "openai"), IMAGE_EDITS)
    assert capabilities.of(None, "anthropic") == {"chat"}
    assert capabilities.of(["audio"], "ollama") == {"transcriptions", "speech"}
    assert not serves(frozenset(capabilities.NAMES), "messages")  # no capability: none serves it
    assert set(CAPABILITY_OF.values()) == set(capabilities.NAMES)


def test_capabilities_config_names_are_checked(tmp_path: Path):
    path = tmp_path / "a.toml"
    path.write_text('[[backends]]\nname = "v"\nurl = "http://127.0.0.1:8000/v1"\ncapabilities = ["chat", "rerank"]\n')
    assert load_settings(path, environ={}).backends[0].capabilities == ["chat", "rerank"]
    path.write_text('[[backends]]\nname = "v"\nurl = "http://127.0.0.1:8000/v1"\ncapabilities = ["chat", "tts"]\n')
    with pytest.raises(ConfigError, match=r"a.toml:4: backends\[0\].capabilities: unknown 'tts'"):
        load_settings(path, environ={})


@pytest.mark.parametrize(("answer", "tokens"), [
    ({"usage": {"total_tokens": 12}}, Tokens(12, 0)),  # vLLM, Jina rerank
    ({"usage": {"prompt_tokens": 8, "total_tokens": 8}}, Tokens(8, 0)),  # vLLM score
    ({"usage": {"type": "tokens", "input_tokens": 14, "output_tokens": 7, "total_tokens": 21}}, Tokens(14, 7)),
    ({"meta": {"billed_units": {"input_tokens": 9, "search_units": 1}}}, Tokens(9, 0)),  # Cohere
    ({"results": []}, Tokens(5, 0, estimated=True)),  # nothing reported: the texts, estimated
])
def test_extension_tokens(answer, tokens):
    body = {"model": "m", "query": "abcdefgh", "documents": ["abcd", {"text": "abcdefgh"}, 7]}
    assert from_extension(answer, body) == tokens


def test_estimates_cover_rerank_and_score_bodies():
    assert estimate_prompt({"query": "abcd", "documents": ["abcd"]}) == 2
    assert estimate_prompt({"text_1": "abcd", "text_2": ["abcd", "abcdefgh"]}) == 4
    assert estimate_prompt({"input": "abcdefgh"}) == 2


def test_multipart_parts_know_where_their_content_is():
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nRIFF\r\n'
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n--b--\r\n')
    for step in (1, 5, len(body)):
        parser = multipart.MultipartParser(b"b")
        events = [e for i in range(0, len(body), step) for e in parser.feed(body[i:i + step])
                  if not isinstance(e, multipart.Data)]
        spans = [(events[i].name, body[events[i].at:events[i + 1].at]) for i in range(0, len(events), 2)]
        assert spans == [("file", b"RIFF"), ("model", b"whisper")]


class _Source:
    def __init__(self, data: bytes, size: int, cuts: tuple[int, ...] = ()) -> None:
        """``data`` in pieces of ``size`` bytes, or cut at the offsets ``cuts``."""
        edges = cuts or range(size, len(data), size)
        self._chunks = [data[a:b] for a, b in zip((0, *edges), (*edges, len(data)), strict=True)]
        self.read_count = 0

    async def read(self) -> bytes | None:
        self.read_count += 1
        return self._chunks.pop(0) if self._chunks else None


def _body(parts: list[tuple[str, bytes]], filename: str = "a.wav") -> bytes:
    out = b""
    for name, value in parts:
        extra = f'; filename="{filename}"' if name == "file" else ""
        out += f'--B\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'.encode() + value + b"\r\n"
    return out + b"--B--\r\n"


async def _sent(upload: uploads.Upload, model: str) -> bytes:
    return b"".join([chunk async for chunk in upload.chunks(model)])


@pytest.mark.parametrize("file_size", [10, 600_000])  # held in memory; spooled past PEEK_BYTES
def test_upload_replays_its_prefix_and_renames_the_model(tmp_path: Path, file_size: int):
    async def run() -> None:
        body = _body([("file", b"x" * file_size), ("model", b"alias"), ("language", b"en")])
        upload = uploads.Upload(_Source(body, 4096), "multipart/form-data; boundary=B", b"B", declared=len(body),
                                max_bytes=10**9, spool_dir=tmp_path)
        fields = await upload.scan()
        assert fields["model"] == "alias" and upload.replayable
        assert upload.length("alias") == len(body) and upload.length("target-name") == len(body) + 6
        renamed = body.replace(b"\r\n\r\nalias\r\n", b"\r\n\r\ntarget-name\r\n")
        assert await _sent(upload, "target-name") == renamed
        assert upload.replayable  # the model came last: the whole body was held, so it can go out again
        assert await _sent(upload, "alias") == body
        upload.close()

    asyncio.run(run())


def test_a_spooled_upload_sends_its_last_small_piece(tmp_path: Path):
    """The spool takes the prefix in big writes, then the few bytes that end it: those too reach the backend
    (a buffered spool once kept them back, and the backend waited for bytes its Content-Length promised)."""
    async def run() -> None:
        body = _body([("file", b"x" * (2 * 1024 * 1024)), ("model", b"alias")])
        upload = uploads.Upload(_Source(body, 0, cuts=(len(body) - 100,)), "multipart/form-data; boundary=B",
                                b"B", declared=len(body), max_bytes=10**9, spool_dir=tmp_path)
        await upload.scan()
        assert await _sent(upload, "alias") == body
        upload.close()

    asyncio.run(run())


def test_upload_before_the_body_flowed_can_be_sent_again(tmp_path: Path):
    async def run() -> None:
        body = _body([("model", b"m"), ("file", b"y" * 100_000)])
        upload = uploads.Upload(_Source(body, 1000), "multipart/form-data; boundary=B", b"B", declared=None,
                                max_bytes=10**9, spool_dir=tmp_path)
        await upload.scan()
        first = upload.chunks("m")
        assert await anext(first)  # the prefix only: a backend that fails now leaves the upload whole
        assert upload.replayable
        assert await _sent(upload, "m") == body

    asyncio.run(run())


def test_upload_limits(tmp_path: Path):
    async def run(body: bytes, declared: int | None, most: int) -> None:
        upload = uploads.Upload(_Source(body, 1000), "multipart/form-data; boundary=B", b"B", declared=declared,
                                max_bytes=most, spool_dir=tmp_path)
        await upload.scan()
        await _sent(upload, "m")

    body = _body([("model", b"m"), ("file", b"z" * 5000)])
    with pytest.raises(GatewayError, match="max_upload_mb") as declared:
        asyncio.run(run(body, len(body), 4000))
    assert declared.value.status == 413
    with pytest.raises(GatewayError, match="max_upload_mb"):
        asyncio.run(run(body, None, 4000))  # counted as it flows
    with pytest.raises(GatewayError, match="model parameter"):
        asyncio.run(run(_body([("file", b"z")]), None, 10**6))
