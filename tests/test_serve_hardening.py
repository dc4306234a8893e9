"""The served model's front door under hostile requests (issue 14, serving).

A real ``mlflow models serve`` of a registered DTFD-MIL ensemble on 127.0.0.1, with a small
``max_request_mb`` set at serve time: oversized bodies are refused before they are read,
garbage, a NUL byte, CSV and every other refusal get one short JSON line without traceback
or server paths, and a valid request is answered while a bad upload is still arriving.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import mlflow
import numpy as np
import pytest
from projects import BIN
from serving import fit_ensemble, isolated_store, model_server, request_row
from test_serve import BAD, publish

from wsimil.serve.limits import RequestGuard, guard_scoring_server, one_line, shorten
from wsimil.serve.pyfunc import SLIDE_ROOT_ENV

LIMIT_MB = 4
SMALL = 1024  # bytes an error answer may take


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """(champion URI, fitted ensemble, folder) of a DTFD-MIL ensemble in a temporary store."""
    root = tmp_path_factory.mktemp("guarded")
    with isolated_store(root), pytest.MonkeyPatch.context() as mp:
        mp.delenv(SLIDE_ROOT_ENV, raising=False)
        fitted = fit_ensemble("dtfd", root / "dtfd")
        yield publish(fitted.models_dir, "wsimil-test-guarded"), fitted, root


@pytest.fixture(scope="module")
def guarded(registered):
    """(URL, slide root, fitted ensemble) of the champion served with a 4 MB limit."""

    uri, fitted, root = registered
    slides = root / "slides"
    slides.mkdir()
    (slides / "junk.svs").write_bytes(b"not a slide")
    env = {
        **os.environ,  # the registered fixture's tracking store
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        SLIDE_ROOT_ENV: str(slides),
        "SERVING_MODEL_CONFIG": json.dumps({"max_instances": 30, "max_request_mb": LIMIT_MB}),
    }
    with model_server(uri, env, root / "server.log") as url:
        yield url, slides, fitted


def post(url: str, body, content_type: str = "application/json", timeout: float = 60):
    import requests

    return requests.post(
        f"{url}/invocations", data=body, headers={"Content-Type": content_type}, timeout=timeout
    )


def assert_short_error(r, status: int, *words: str) -> dict:
    """One small JSON object, one line, no traceback, no echo of the request."""
    assert r.status_code == status, r.text[:500]
    assert len(r.content) < SMALL, r.content[:500]
    answer = r.json()
    assert set(answer) == {"error_code", "message"}
    assert "\n" not in answer["message"] and "Traceback" not in r.text
    assert "site-packages" not in r.text and "Failed to predict data" not in r.text
    for w in words:
        assert w in answer["message"], answer
    return answer


def valid_body(fitted) -> str:
    return json.dumps({"dataframe_records": [request_row(fitted.held_out[0], ("20x",))]})


def read_answer(s: socket.socket) -> tuple[bytes, bytes]:
    """The status line + headers and the body of one HTTP answer (by its Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536) or b"\r\n\r\n"  # closed: what came is all there is
    head, _, body = data.partition(b"\r\n\r\n")
    length = [
        int(h.split(b":")[1])
        for h in head.lower().split(b"\r\n")
        if h.startswith(b"content-length:")
    ]
    while length and len(body) < length[0] and (more := s.recv(65536)):
        body += more
    return head, body


@pytest.mark.slow
def test_a_body_over_the_limit_is_refused_from_its_header_before_it_is_read(guarded):
    url, _, _ = guarded
    port = int(url.rsplit(":", 1)[1])
    declared = 50 * 2**20  # the fault catalogue's 50 MB garbage body
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % declared + b"\x00" * 4096  # and no more
        )
        head, body = read_answer(s)
    assert head.startswith(b"HTTP/1.1 413"), head
    answer = json.loads(body)
    assert answer["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert "50.0 MB" in answer["message"] and f"limit of {LIMIT_MB} MB" in answer["message"]
    assert "serve.max_request_mb" in answer["message"] and len(body) < SMALL


@pytest.mark.slow
def test_a_streamed_body_is_cut_off_at_the_limit(guarded):
    url, _, fitted = guarded
    chunk = b" " * 2**16

    def chunks():  # no Content-Length: chunked, 6 MB in all
        yield b'{"dataframe_records": ['
        for _ in range(6 * 16):
            yield chunk

    assert_short_error(post(url, chunks()), 413, f"limit of {LIMIT_MB} MB")
    assert post(url, valid_body(fitted)).status_code == 200  # the connection pool still works


@pytest.mark.slow
def test_garbage_under_the_limit_gets_a_small_answer_and_a_valid_request_is_not_held(guarded):
    url, _, fitted = guarded
    garbage = np.random.default_rng(0).bytes(3 * 2**20)  # echoed, this made a 22 MB answer
    assert_short_error(post(url, garbage), 400, "not valid JSON", "dataframe_records")
    assert_short_error(post(url, b"[1, 2]"), 400, "JSON list, not an object")

    # a slow bad upload holds the server's only worker no longer than its own bytes arrive
    arrived = threading.Event()
    result = {}

    def slow_garbage():
        for i in range(30):  # 3 MB over about 3 s
            yield garbage[i * 2**17 : (i + 1) * 2**17]
            time.sleep(0.1)
        arrived.set()

    def send_bad():
        result["bad"] = post(url, slow_garbage())

    sender = threading.Thread(target=send_bad)
    sender.start()
    time.sleep(0.5)
    good = post(url, valid_body(fitted))
    answered_during_upload = not arrived.is_set()
    sender.join(timeout=120)
    assert good.status_code == 200 and good.json()["predictions"][0]["bag_id"]
    assert answered_during_upload
    assert_short_error(result["bad"], 400, "not valid JSON")


@pytest.mark.slow
def test_a_nul_byte_csv_and_other_content_types_get_one_json_line(guarded):
    import requests

    url, slides, _ = guarded
    nul = json.dumps({"dataframe_records": [{"slide_path": "junk\x00.svs"}]})
    answer = assert_short_error(post(url, nul), 400, "NUL or control characters")
    assert str(slides) not in answer["message"]
    damaged = json.dumps({"dataframe_records": [{"slide_path": "junk.svs"}]})
    answer = assert_short_error(post(url, damaged), 400, "cannot embed slides")
    assert str(slides) not in answer["message"]
    csv = "bag_id,slide_path\nb1,junk.svs\n"
    assert_short_error(post(url, csv, "text/csv"), 415, "CSV cannot carry", "application/json")
    assert_short_error(post(url, "x", "text/plain"), 415, "application/json")
    assert_short_error(post(url, "{}", "application/json; charset=latin-1"), 415, "UTF-8")
    r = requests.get(f"{url}/nowhere", timeout=10)
    assert_short_error(r, 404)
    assert requests.get(f"{url}/ping", timeout=10).status_code == 200


@pytest.mark.slow
def test_every_refusal_of_the_model_is_one_short_line(guarded):
    url, _, _ = guarded
    for case, (record, params, status, words) in sorted(BAD.items()):
        if case == "no_slide_root":  # this server has a slide root
            continue
        body = {"dataframe_records": [{"bag_id": "b1", **record}]}
        if params:
            body["params"] = params
        answer = assert_short_error(post(url, json.dumps(body)), status, words)
        assert answer["error_code"] == "INVALID_PARAMETER_VALUE", case
    wrong_key = json.dumps({"records": [{"bag_id": "b1"}]})
    assert_short_error(post(url, wrong_key), 400, "dataframe_records")


def test_the_guard_is_installed_only_inside_the_scoring_server(registered):
    from fastapi import FastAPI

    before = FastAPI.build_middleware_stack
    model = mlflow.pyfunc.load_model(registered[0])  # in this process, not a scoring server
    assert model is not None and FastAPI.build_middleware_stack is before
    assert guard_scoring_server(2**20) is False


def test_shortening_drops_the_echo_and_the_traceback():
    echoed = json.dumps(
        {
            "error_code": "INVALID_PARAMETER_VALUE",
            "message": "Failed to predict data '   features_20x\n0  [[1, 2]]'. \nError: bag 'b1': "
            + "x" * 5000,
            "stack_trace": 'Traceback (most recent call last):\n  File "/srv/app.py"',
        }
    ).encode()
    message, code = shorten(echoed)
    assert code == "INVALID_PARAMETER_VALUE" and message.startswith("bag 'b1': ")
    assert len(one_line(message)) <= 400 and one_line(message).endswith("...")
    assert shorten(b"Request processing time exceeded limit") == (
        "Request processing time exceeded limit",
        None,
    )
    assert RequestGuard(None, 1).too_large("2.0 MB").startswith("the request body is 2.0 MB")
