"""A small HTTP/1.1 client on asyncio streams, for the backend adapters.

Why not http.client or a dependency: http.client blocks, so it would run in a worker thread
that a timeout cannot stop (a server that trickles one byte a second keeps the thread for
as long as it likes); aiohttp or httpx would add a dependency tree to a root daemon for four
JSON calls to loopback. On asyncio streams one ``asyncio.timeout`` bounds the whole
exchange and cancels it for real.

What it does: one request per connection (``Connection: close``), JSON in and out, the
answer's body read with ``Content-Length``, chunked, or to EOF, and never more than
``max_bytes``. Every failure is an :class:`HttpProblem` with one sentence; ``unreachable``
tells "nothing answered" (the backend is down) from "it answered something unusable".
GETs are retried once after a connection-level failure (refused, reset, closed before an
answer: a server restarting); a timeout is not retried, since a server past its timeout is
stuck rather than restarting and a retry would double the wait of the demote asking.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

_MAX_LINE = 16 * 1024  # one status or header line
_MAX_HEADERS = 100
_RETRY_AFTER = 0.2  # seconds between the two tries of a GET


class HttpProblem(Exception):
    def __init__(
        self, reason: str, *, unreachable: bool = False, retry: bool = False, status: int = 0
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unreachable = unreachable
        """Nothing answered: the backend is down (or stuck), not confused."""
        self.retry = retry
        """A connection-level failure a restarting server gives: worth one more GET."""
        self.status = status


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes

    def json(self, what: str) -> Any:
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError):  # RecursionError: a body of 100,000 '['
            raise HttpProblem(f"{what} answered something that is not JSON") from None


def check_url(url: str) -> str:
    """``url`` without a trailing slash, or ValueError saying what is wrong with it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{url!r} must be scheme://host:port[/path] only")
    try:
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        raise ValueError(f"{url!r} has a port that is not a number") from None
    return url.rstrip("/")


def _summary(body: bytes) -> str:
    """The first line of an error answer, printable and short, for the reason."""
    text = body[:200].decode("utf-8", "replace").splitlines()[0] if body.strip() else ""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return f": {text}" if text else ""


class Http:
    def __init__(self, base: str, connect: float, total: float, max_bytes: int) -> None:
        self.base = base.rstrip("/")
        self.connect = connect
        self.total = total
        self.max_bytes = max_bytes

    async def get_json(self, path: str, model: type[M], *, ok: tuple[int, ...] = (200,)) -> M:
        reply = await self.request("GET", path, ok=ok)
        return self.validate(reply, f"GET {path}", model)

    async def post_json(
        self, path: str, body: Any, *, ok: tuple[int, ...] = (200,), total: float | None = None
    ) -> Reply:
        return await self.request("POST", path, body, ok=ok, total=total)

    def validate(self, reply: Reply, what: str, model: type[M]) -> M:
        """``reply``'s JSON as ``model``; ``what`` is the request ("GET /api/ps")."""
        data = reply.json(what)
        try:
            return model.model_validate(data)
        except ValidationError as err:
            e = err.errors()[0]
            loc = ".".join(str(p) for p in e["loc"]) or "the answer"
            raise HttpProblem(
                f"{what} answered JSON of another shape ({loc}: {e['msg']})"
            ) from None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        ok: tuple[int, ...] = (200,),
        total: float | None = None,
    ) -> Reply:
        tries = 2 if method == "GET" else 1
        for attempt in range(tries):
            try:
                reply = await self._once(method, path, body, total or self.total)
            except HttpProblem as problem:
                if problem.retry and attempt + 1 < tries:
                    await asyncio.sleep(_RETRY_AFTER)
                    continue
                raise
            if reply.status not in ok:
                raise HttpProblem(
                    f"{method} {path} answered HTTP {reply.status}{_summary(reply.body)}",
                    status=reply.status,
                )
            return reply
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _once(self, method: str, path: str, body: Any, total: float) -> Reply:
        what = f"{method} {path}"
        try:
            async with asyncio.timeout(total):
                return await self._exchange(method, path, body)
        except TimeoutError:
            raise HttpProblem(
                f"{what} got no answer within {total:g} s", unreachable=True
            ) from None

    async def _exchange(self, method: str, path: str, body: Any) -> Reply:
        what = f"{method} {path}"
        parts = urlsplit(self.base)
        host = parts.hostname or ""
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host, port, ssl=ssl.create_default_context() if tls else None, limit=_MAX_LINE
                ),
                self.connect,
            )
        except TimeoutError:
            raise HttpProblem(
                f"no connection to {host}:{port} within {self.connect:g} s",
                unreachable=True,
            ) from None
        except OSError as err:
            raise HttpProblem(
                f"cannot connect to {host}:{port} ({err.strerror or err})",
                unreachable=True,
                retry=True,
            ) from None
        try:
            payload = b"" if body is None else json.dumps(body).encode()
            target = quote(parts.path.rstrip("/") + path, safe="/?=&%:")
            head = [
                f"{method} {target} HTTP/1.1",
                f"Host: {parts.netloc}",
                "Connection: close",
                "Accept: application/json",
                "User-Agent: speedloaderd",
            ]
            if body is not None or method == "POST":
                head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
            await writer.drain()
            return await self._read_reply(reader, what)
        except (ConnectionError, asyncio.IncompleteReadError):
            raise HttpProblem(
                f"{what}: the connection closed before a whole answer",
                unreachable=True,
                retry=True,
            ) from None
        except (asyncio.LimitOverrunError, ValueError) as err:  # a line past _MAX_LINE
            raise HttpProblem(f"{what} answered something that is not HTTP ({err})") from None
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    async def _read_reply(self, reader: asyncio.StreamReader, what: str) -> Reply:
        line = await reader.readline()
        if not line:
            raise HttpProblem(
                f"{what}: the server closed without answering", unreachable=True, retry=True
            )
        fields = line.decode("latin-1").split(None, 2)
        if len(fields) < 2 or not fields[0].startswith("HTTP/1.") or not fields[1].isdigit():
            raise HttpProblem(f"{what} answered something that is not HTTP")
        status = int(fields[1])
        headers: dict[str, str] = {}
        for _ in range(_MAX_HEADERS + 1):
            raw = await reader.readline()
            if raw in (b"\r\n", b"\n", b""):
                break
            name, sep, value = raw.decode("latin-1").partition(":")
            if not sep:
                raise HttpProblem(f"{what} answered a malformed header line")
            headers[name.strip().lower()] = value.strip()
        else:
            raise HttpProblem(f"{what} answered more than {_MAX_HEADERS} headers")
        too_big = HttpProblem(f"{what} answered more than {self.max_bytes} bytes")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks = bytearray()
            while True:
                size_line = (await reader.readline()).split(b";")[0].strip()
                try:
                    size = int(size_line, 16)
                except ValueError:
                    raise HttpProblem(f"{what} answered a malformed chunk") from None
                if size == 0:
                    break
                if len(chunks) + size > self.max_bytes:
                    raise too_big
                chunks += await reader.readexactly(size)
                await reader.readexactly(2)  # the CRLF after each chunk
            return Reply(status, bytes(chunks))
        if "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise HttpProblem(f"{what} answered a malformed Content-Length") from None
            if length > self.max_bytes:
                raise too_big
            return Reply(status, await reader.readexactly(length))
        data = await reader.read(self.max_bytes + 1)
        while len(data) <= self.max_bytes:
            more = await reader.read(self.max_bytes + 1 - len(data))
            if not more:
                break
            data += more
        if len(data) > self.max_bytes:
            raise too_big
        return Reply(status, data)
