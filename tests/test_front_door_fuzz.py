"""A property-based fuzz of the front door's routes, on a real llama-server (tiny model).

Whatever a client sends (method, path with percent-encoded bytes, query, headers, a
body that is JSON, nested deep, or not JSON at all), the front door:

* never answers a 5xx of its own (``"source": "frontdoor"``);
* answers every error with a JSON body in OpenAI's shape that says where it came from;
* leaves no slot taken: after each request the router has nothing in flight or queued;

and after the run a valid request still succeeds.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import StackFactory, free_ports
from test_api import FAST_MONITOR, Fleet, srv

ADMIN = "Bearer boss"
PREFIXES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/completion",
    "/tokenize",
    "/detokenize",
    "/infill",
    "/apply-template",
    "/v1/models",
    "/health",
    "/ready",
    "/metrics",
    "/upstream/m",
    "/upstream/nope",
    "/admin/status",
    "/admin/checkpoints",
    "/admin/start",
    "/admin/stop",
    "/v1",
    "",
]
KEYS = ["model", "messages", "prompt", "content", "tokens", "input", "stream", "name", "kv", "role", "n_probs"]
NAMES = ["m", "nope", "", "M", "m ", "default", "worker_coder"]
# Admin changes the fuzz must not make with the right key: they would stop the backend it is fuzzing.
CHANGES = re.compile(r"^/admin/(start|stop|reload)/|^/admin/checkpoints/.")

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(NAMES),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner)
    ),
    max_leaves=12,
)


@st.composite
def json_body(draw: st.DrawFn) -> bytes:
    value = draw(json_value)
    if isinstance(value, dict):
        value.update({"max_tokens": 2, "n_predict": 2})  # whatever else it asks, it is answered soon
    return json.dumps(value).encode()


@st.composite
def deep_body(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(500, 3000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"model":', "}"), ('{"messages":[', "]}")]))
    return (opener * depth + "1" + closer * depth).encode()


segment = st.one_of(
    st.sampled_from(["m", "x", "completion", "tokenize", "health", "slots", "0", "..", ".", "", "%", "%zz", "%2F"]),
    st.binary(max_size=6).map(lambda b: urllib.parse.quote_from_bytes(b, safe="")),
    st.text(st.characters(codec="utf-8"), max_size=4).map(lambda t: urllib.parse.quote(t, safe="!$&'()*+,;=:@")),
)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=30)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    segments = draw(
        st.one_of(st.just([]), st.lists(segment, min_size=1, max_size=3))
    )  # a route as it is, half the time
    path = draw(st.sampled_from(PREFIXES)) + "".join("/" + s for s in segments)
    if draw(st.integers(0, 3)) == 0:
        path += "/"
    if not path.startswith("/"):
        path = "/" + path
    query = draw(st.one_of(st.just(""), st.lists(segment, min_size=1, max_size=3).map(lambda q: "?" + "&".join(q))))
    headers: dict[str, str] = {}
    for name, values in (
        ("Content-Type", st.sampled_from(["application/json", "text/plain", "multipart/form-data", ""])),
        ("X-Task-Type", st.one_of(st.sampled_from(NAMES), header_text)),
        ("Authorization", st.one_of(st.sampled_from([ADMIN, "Bearer wrong", "Basic Zm9vOmJhcg==", "bearer"]))),
        ("Accept", st.sampled_from(["*/*", "text/event-stream", "application/json"])),
        ("X-Anything", header_text),
    ):
        if draw(st.booleans()):
            headers[name] = draw(values).strip()
    body = draw(
        st.one_of(
            st.none(),
            json_body(),
            deep_body(),
            st.binary(max_size=64),
            st.builds(
                lambda model, stream: json.dumps(
                    {"model": model, "stream": stream, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
                ).encode(),
                st.one_of(st.sampled_from(NAMES), st.integers(), st.none()),
                st.booleans(),
            ),
        )
    )
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "PROPFIND"]))
    return {"method": method, "target": path + query, "headers": headers, "body": body, "chunked": draw(st.booleans())}


@pytest.fixture
def fleet(make_stack: StackFactory) -> Iterator[Callable[..., Fleet]]:
    def start(servers_yaml: str, api_extra: str = "") -> Fleet:
        (api_port,) = free_ports(1)
        stack = make_stack(servers_yaml + FAST_MONITOR + f"api: {{port: {api_port}{api_extra}}}\n")
        stack.start(stack.select())
        return Fleet(stack, api_port, key="boss")

    yield start


def send(port: int, req: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(req["method"], req["target"], skip_accept_encoding=True)
        body: bytes | None = req["body"]
        for name, value in req["headers"].items():
            conn.putheader(name, value.encode("latin-1"))
        if body is not None and req["chunked"]:
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for i in range(0, len(body), 1000):
                piece = body[i : i + 1000]
                conn.send(b"%x\r\n%b\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        else:
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_the_front_door_answers_every_client_mistake_in_shape_and_frees_every_slot(
    fleet: Callable[..., Fleet], tiny_model: Path
) -> None:
    (a,) = free_ports(1)
    f = fleet("servers:\n" + srv("m", tiny_model, a, "[m]", parallel=2), api_extra=", admin_key: boss")
    port = int(f.url.rsplit(":", 1)[1])
    admin = httpx.Client(base_url=f.url, headers=f.headers, timeout=10)

    def idle() -> bool:
        view = admin.get("/admin/status").json()
        return all(i["in_flight"] == 0 and i["queued"] == 0 for i in view["instances"])

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(req=requests())
    def check(req: dict[str, Any]) -> None:
        decoded = urllib.parse.unquote(req["target"].split("?")[0])
        if CHANGES.match(decoded) and req["headers"].get("Authorization") == ADMIN:
            req["headers"]["Authorization"] = "Bearer wrong"
        status, headers, body = send(port, req)
        assert 100 <= status < 600
        if status >= 400 and req["method"] != "HEAD":
            assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:200])
            error = json.loads(body)["error"]
            assert isinstance(error["message"], str) and error["type"] and error["code"] == status, error
            assert error["source"] in ("frontdoor", "backend"), error
            assert status < 500 or error["source"] == "backend", error
        f.wait_for("every slot to be free", idle, timeout_s=5)

    t0 = time.monotonic()
    with admin:
        check()
        assert idle()
    assert time.monotonic() - t0 < 120
    resp = httpx.post(
        f.url + "/v1/chat/completions",
        json={"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert resp.status_code == 200 and resp.json()["choices"]
