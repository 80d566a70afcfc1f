"""GET /admin/debug/profile on the shared appliance (2 workers): a live profile of the worker that answers."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.support.appliance import ADMIN_KEY, Appliance

pytestmark = pytest.mark.frozen  # the one-file build must carry pyinstrument

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROFILE = "/admin/debug/profile"
CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "profile me"}]}


def under_load(gateway: Appliance, ask: Any) -> tuple[Any, int]:
    """``ask()``'s result, with chats on fresh connections (both workers get some) the whole time it runs;
    also how many chats were answered."""
    done = threading.Event()
    answered = []

    def load() -> None:
        while not done.is_set():
            response = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=30)
            answered.append(response.status_code)

    with ThreadPoolExecutor(4) as pool:
        loaders = [pool.submit(load) for _ in range(3)]
        try:
            result = ask()
        finally:
            done.set()
        for loader in loaders:
            loader.result()
    assert set(answered) == {200}
    return result, len(answered)


def test_the_profile_names_the_request_path_of_the_worker_that_answered(gateway: Appliance) -> None:
    pids = gateway.worker_pids(2)
    response, chats = under_load(gateway, lambda: httpx.get(gateway.url + PROFILE, params={"seconds": 2},
                                                            headers=AUTH, timeout=60))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert int(response.headers["x-appliance-worker"]) in pids
    text = response.text
    print(f"{chats} chats during the profile:\n{text}")  # shown with -s
    assert f"worker pid {response.headers['x-appliance-worker']}" in text
    # The appliance's own request path, by file and function, whatever the load's share of this worker.
    for where in ("appliance/core/pipeline.py", "appliance/core/relay.py", "appliance/server/routes/openai.py"):
        assert where in text, where
    assert "_attempt" in text and "answer_rendered" in text


def test_speedscope_format(gateway: Appliance) -> None:
    response, _ = under_load(gateway, lambda: httpx.get(gateway.url + PROFILE, params={"seconds": 2,
                                                                                      "format": "speedscope"},
                                                        headers=AUTH, timeout=60))
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    profile = json.loads(response.text)
    assert profile["$schema"].startswith("https://www.speedscope.app/")
    frames = {(frame["name"], (frame.get("file") or "").rpartition("appliance/")[2])
              for frame in profile["shared"]["frames"]}
    assert {("serve", "core/pipeline.py"), ("_attempt", "core/pipeline.py")} <= frames, sorted(frames)


def test_one_profile_at_a_time_per_worker(gateway: Appliance) -> None:
    # Three at once over two workers: two of them meet on one worker, whatever the spread.
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: httpx.get(gateway.url + PROFILE, params={"seconds": 3}, headers=AUTH,
                                                    timeout=60), range(3)))
    statuses = sorted(answer.status_code for answer in answers)
    assert 200 in statuses and 409 in statuses, statuses
    refused = next(answer for answer in answers if answer.status_code == 409).json()["error"]
    assert refused["code"] == "profile_in_progress" and refused["type"] == "invalid_request_error"


@pytest.mark.parametrize(("query", "param"), [
    ({"seconds": 0}, "seconds"), ({"seconds": 61}, "seconds"), ({"seconds": "2.5"}, "seconds"),
    ({"seconds": ""}, "seconds"), ({"seconds": "ten"}, "seconds"), ({"format": "html"}, "format"),
    ({"seconds": 1, "interval": 5}, "interval"),
])
def test_bad_parameters_are_400_naming_them(gateway: Appliance, query: dict[str, Any], param: str) -> None:
    response = httpx.get(gateway.url + PROFILE, params=query, headers=AUTH, timeout=10)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_only_admin_keys_may_profile(gateway: Appliance) -> None:
    status, body, _ = gateway.post("/admin/keys", {"name": "not an admin", "role": "user"})
    assert status == 201, body
    response = httpx.get(gateway.url + PROFILE, params={"seconds": 1},
                         headers={"Authorization": f"Bearer {body['key']}"}, timeout=10)
    assert response.status_code == 403 and response.json()["error"]["code"] == "endpoint_not_allowed"
    assert httpx.get(gateway.url + PROFILE, timeout=10).status_code == 401
