"""The scoring server's front door: a request-size limit, JSON only, short error answers.

``mlflow models serve`` runs MLflow's scoring server (FastAPI under uvicorn), which

- reads the whole body, however large, before looking at it;
- echoes the input in its 400 answers: a body that is not JSON is formatted into the
  message as a bytes repr, so 50 MB of garbage got a 368 MB answer and held the worker for
  seconds; a model's own refusal comes back prefixed with the request DataFrame's repr;
- attaches a Python traceback (server paths included) to any error it did not expect;
- accepts ``text/csv``, which cannot carry this model's array columns (MLflow cannot even
  map their ``Any`` type to a pandas dtype), so every CSV request failed with a traceback.

:class:`RequestGuard` is a plain ASGI middleware placed in front of that app. For
``POST /invocations`` it refuses a body over ``max_request_mb`` with a 413 (from the
``Content-Length`` header before reading anything, or as soon as a streamed body passes the
limit), anything but ``application/json`` with a 415, and a body that is not one JSON object
with a 400, all before MLflow sees them. Every answer of 400 or more, its own or the app's,
becomes one JSON object ``{"error_code": ..., "message": ...}`` of one line, at most
``MAX_MESSAGE`` characters; a stripped traceback goes to the server log instead.

MLflow offers no hook for middleware, and the served model is loaded *before* the app is
built (``app = init(load_model(...))``), so :func:`guard_scoring_server`, called from the
model's ``load_context``, wraps ``FastAPI.build_middleware_stack``: the scoring server app,
built right after, starts with the guard outermost. It does so only inside the scoring
server process, so loading the model elsewhere (a notebook, the tests) changes nothing.
Knows nothing of the model; a proxy in front (``docker/nginx.conf``) can enforce the same
limit earlier.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

log = logging.getLogger(__name__)

SCORING_APP_MODULE = "mlflow.pyfunc.scoring_server.app"  # what `mlflow models serve` runs
JSON_PATHS = ("/invocations",)
MAX_MESSAGE = 400  # characters of an error message
MAX_ERROR_BODY = 1 << 20  # bytes of the app's error answer kept to shorten (the rest dropped)
CODES = {
    400: "BAD_REQUEST",
    403: "PERMISSION_DENIED",
    404: "RESOURCE_DOES_NOT_EXIST",
    405: "BAD_REQUEST",
    413: "REQUEST_LIMIT_EXCEEDED",
    415: "BAD_REQUEST",
    422: "BAD_REQUEST",
    504: "DEADLINE_EXCEEDED",
}
SEND_JSON = (
    'send application/json: {"dataframe_records": [one record per bag]} (columns in the model card)'
)


class RequestGuard:
    """ASGI middleware: see the module docstring.

    Args:
        app: the ASGI app behind it.
        max_body_bytes: the largest request body ``POST /invocations`` accepts.
    """

    def __init__(self, app, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = ShortErrors(send)
        if scope["method"] == "POST" and scope["path"] in JSON_PATHS:
            body, refusal = await self.read_json_body(scope, receive)
            if refusal is not None:
                await send.json(*refusal)
                return
            receive = replay(body, receive)
        await self.app(scope, receive, send)

    async def read_json_body(self, scope, receive) -> tuple[bytes, tuple | None]:
        """The whole body, or ``(status, message)`` why it is refused (nothing more read)."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        mime = headers.get("content-type", "").split(";")[0].strip().lower()
        if mime != "application/json":
            why = "its columns hold arrays, which CSV cannot carry; " if "csv" in mime else ""
            return b"", (415, f"content type {mime or 'none'!r} is not accepted: {why}{SEND_JSON}")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return b"", (413, self.too_large(f"{int(declared) / 2**20:.1f} MB"))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", (400, "the client went away before the request body ended")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", (413, self.too_large("more than that"))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = await asyncio.to_thread(json_problem, body)  # the event loop keeps serving
        return body, None if problem is None else (400, f"{problem}; {SEND_JSON}")

    def too_large(self, size: str) -> str:
        limit = self.max_body_bytes / 2**20
        return (
            f"the request body is {size}, over this server's limit of {limit:g} MB "
            "(serve.max_request_mb); send fewer bags per request, or features as base64 .npy "
            "(features_<scale>_npy), which is about 3x smaller than JSON rows"
        )


def json_problem(body: bytes) -> str | None:
    """Why ``body`` is not one JSON object (None when it is); never quotes the body."""
    try:
        value = json.loads(body)
    except UnicodeDecodeError:
        return "the request body is not valid JSON (not UTF-8 text)"
    except json.JSONDecodeError as exc:
        return f"the request body is not valid JSON ({exc.msg} at byte {exc.pos})"
    except RecursionError:
        return "the request body nests JSON too deeply"
    if not isinstance(value, dict):
        return f"the request body is a JSON {type(value).__name__}, not an object"
    return None


def replay(body: bytes, receive):
    """An ASGI ``receive`` that gives ``body`` once, then defers to the real one."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class ShortErrors:
    """An ASGI ``send`` that turns every answer of 400 or more into one short JSON line."""

    def __init__(self, send) -> None:
        self.send = send
        self.error_start: dict | None = None
        self.error_body = bytearray()

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self.error_start = message  # held until the body is complete
            return
        if self.error_start is None or message["type"] != "http.response.body":
            await self.send(message)
            return
        room = MAX_ERROR_BODY - len(self.error_body)
        self.error_body += message.get("body", b"")[: max(room, 0)]
        if not message.get("more_body", False):
            await self.json(self.error_start["status"], *shorten(bytes(self.error_body)))

    async def json(self, status: int, message: str, code: str | None = None) -> None:
        body = json.dumps({"error_code": code or CODES.get(status, "INTERNAL_ERROR"),
                           "message": one_line(message)}).encode()  # fmt: skip
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})


def shorten(body: bytes) -> tuple[str, str | None]:
    """``(message, error_code)`` of an app's error answer, without input echo or traceback."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = body.decode("utf-8", errors="replace")
    if not isinstance(answer, dict):
        return str(answer), None
    if answer.get("stack_trace"):  # for the operator, not the client
        log.warning("error answer without its traceback: %s", str(answer["stack_trace"])[-3000:])
    message = answer.get("message", answer.get("detail", ""))
    # MLflow prefixes a model's refusal with "Failed to predict data '<the request>'. \nError: "
    message = str(message).rpartition("\nError: ")[2]
    code = answer.get("error_code")
    return message, code if isinstance(code, str) else None


def one_line(message: str) -> str:
    """The first line of ``message``, at most ``MAX_MESSAGE`` characters."""
    line = next((s.strip() for s in str(message).splitlines() if s.strip()), "") or "refused"
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3] + "..."


def guard_scoring_server(max_body_bytes: int) -> bool:
    """Put :class:`RequestGuard` in front of the scoring server app this process is building.

    Returns whether it did: only while ``mlflow models serve``'s app module is being
    imported (it loads the model, then builds the app), once per process.
    """
    module = sys.modules.get(SCORING_APP_MODULE)
    if module is None or hasattr(module, "app"):
        return False
    from fastapi import FastAPI

    build = FastAPI.build_middleware_stack
    if getattr(build, "wsimil_guard", False):
        return True

    def build_guarded(app):
        return RequestGuard(build(app), max_body_bytes)

    build_guarded.wsimil_guard = True
    FastAPI.build_middleware_stack = build_guarded
    log.info("requests over %.0f MB are refused; errors are one JSON line", max_body_bytes / 2**20)
    return True
