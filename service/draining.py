"""Every client reads its error, even one that sends the whole body before it reads (Python's urllib.request).

When the app answers before it has read the request body (413 over the upload cap, 401 without a key, 415, 422),
closing the connection with unread bytes in it makes the kernel reset it, and a client still sending never sees the
answer. So, as nginx's lingering close does, the answer is written at once (a client that reads while it sends
stops early), then the rest of the body is read and thrown away, chunk by chunk, never kept, up to a bound in bytes
and in seconds, and only then is the response finished (and the connection closed or kept alive).
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send


async def discard_request_body(receive: Receive, max_bytes: int, timeout_s: float) -> int:
    """Read the rest of a request body and throw it away; stop at its end, when the client leaves, past
    `max_bytes` or after `timeout_s`. Returns the bytes discarded."""
    discarded = 0

    async def discard() -> None:
        nonlocal discarded
        while discarded <= max_bytes:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect
                return
            discarded += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    try:
        await asyncio.wait_for(discard(), timeout_s)
    except asyncio.TimeoutError:
        pass
    return discarded


class DrainUnreadBody:
    """ASGI middleware: if a response ends while its request body is still coming, drain that body (bounded)
    between the response's last bytes and its end."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        has_body = headers.get(b"content-length", b"0") not in (b"", b"0") or b"transfer-encoding" in headers
        expects_continue = headers.get(b"expect", b"").lower() == b"100-continue"
        body_done = not has_body
        asked = False  # did the app ask for the body? (with Expect: 100-continue, asking sends "100 Continue")

        async def tracked_receive() -> Message:
            nonlocal body_done, asked
            asked = True
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def draining_send(message: Message) -> None:
            last = message["type"] == "http.response.body" and not message.get("more_body", False)
            # A client waiting for "100 Continue" that never came sends no body: nothing to drain.
            if not last or body_done or (expects_continue and not asked):
                await send(message)
                return
            await send({**message, "more_body": True})  # the whole answer is on its way to the client now
            await discard_request_body(receive, self.max_bytes, self.timeout_s)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self.app(scope, tracked_receive, draining_send)
