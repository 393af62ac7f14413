"""The one client of speedloaderd that slctl, the dashboard and the tests share.

Thin and typed over dbus-fast: calls return plain Python values (variants unwrapped),
failures raise :class:`ClientError` carrying the daemon's error name and sentence, and
jobs are followed by their signals only (PropertiesChanged, then Completed), never by
polling.

Every string that comes off the bus (property values, method replies, signal bodies,
error messages) passes :func:`printable` here, before any caller sees it: a value
someone put in the daemon's configuration (an ``apiUrl``, a path) must not reach an
admin's terminal as escape sequences. The exception are replies that are documents to
parse (GetConfig's JSON, Introspect's XML: ``DOCUMENTS``), whose newlines are syntax;
their strings are made printable where they are printed.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from dbus_fast import BusType, DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from speedloaderd.bus import names
from speedloaderd.bus.names import BUS_NAME, ERROR_PREFIX, NO_OBJECT, ROOT, escape

from .records import Job

# The bus contract is defined once, in speedloaderd.bus.names; short names for clients.
MANAGER = names.MANAGER_IFACE
POOL = names.POOL_IFACE
MODEL = names.MODEL_IFACE
JOB = names.JOB_IFACE
model_path, pool_path, job_path = names.model_path, names.pool_path, names.job_path
__all__ = [
    "BUS_NAME",
    "NO_OBJECT",
    "ROOT",
    "escape",
    "printable",
    "Client",
    "ClientError",
    "JobResult",
]

PROPERTIES = "org.freedesktop.DBus.Properties"
TOO_LARGE = "TooLarge"  # the reply would not fit in one D-Bus message: read in pages
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"

# Replies that are documents for the caller to parse, not text to show: returned as sent.
DOCUMENTS = {
    (MANAGER, "GetConfig"),
    ("org.freedesktop.DBus.Introspectable", "Introspect"),
}

# Bus errors that mean "the daemon is not there", whoever raised them.
UNREACHABLE = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Disconnected",
    "org.freedesktop.DBus.Error.FileNotFound",
    "org.freedesktop.DBus.Error.NoServer",
}


class ClientError(Exception):
    """A failed call. ``name`` is the short error name for speedloader's own errors
    (``NotAuthorized``, ``NoSuchModel``...), else the full D-Bus error name."""

    def __init__(self, name: str, message: str):
        message = printable(message)
        super().__init__(message)
        self.name = printable(name.removeprefix(ERROR_PREFIX))
        self.message = message

    @property
    def unreachable(self) -> bool:
        return self.name in UNREACHABLE


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


class _Ranked(Protocol):
    @property
    def speed(self) -> int: ...
    @property
    def name(self) -> str: ...


_P = TypeVar("_P", bound=_Ranked)


def fastest_first(pools: Iterable[_P]) -> list[_P]:
    """Pools in the order every client lists them: fastest first, then by name."""
    return sorted(pools, key=lambda p: (-p.speed, p.name))


def printable(text: str) -> str:
    """``text`` with every character that is not printable shown as an escape instead:
    C0 and C1 controls (ESC, BEL, CR, LF, TAB, CSI ``\\x9b``...), DEL, and the invisible
    or reordering ones (bidi overrides, zero-width and line separators), e.g. ``\\x1b``.

    Nothing is kept that a terminal could act on, newlines included: the daemon's
    sentences are one line each, and a value with a newline in it is worth seeing as such.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def unwrap(value: Any, raw: bool = False) -> Any:
    """A D-Bus value as plain Python: variants unwrapped, every string made
    :func:`printable` (unless ``raw``)."""
    if isinstance(value, Variant):
        return unwrap(value.value, raw)
    if isinstance(value, str):
        return value if raw else printable(value)
    if isinstance(value, dict):
        return {unwrap(k, raw): unwrap(v, raw) for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # structs (ListModels' pages) come as tuples
        return [unwrap(v, raw) for v in value]
    return value


def _printable_props(props: dict[str, Variant]) -> dict[str, Any]:
    """A Model's properties as :func:`unwrap` gives them, in one flat pass (they are flat:
    strings, numbers, lists of strings): a catalog of 100,000 is 100,000 of these."""
    out = {}
    for key, var in props.items():
        value = var.value
        if isinstance(value, str):
            value = printable(value)
        elif isinstance(value, list):
            # Holders is a list of (pid, command) structs: those are unwrapped too.
            value = [
                printable(v) if isinstance(v, str) else unwrap(v) if isinstance(v, list) else v
                for v in value
            ]
        out[key] = value
    return out


@dataclass
class JobResult:
    path: str
    success: bool
    message: str
    properties: dict[str, Any] = field(default_factory=dict)


Listener = Callable[[Message], None]


class Client:
    def __init__(self, bus: MessageBus):
        self.bus = bus
        self._listeners: list[Listener] = []
        self._subscribed = False
        bus.add_message_handler(self._dispatch)

    @classmethod
    async def connect(cls, address: str | None = None) -> Client:
        """Connect to the system bus (``DBUS_SYSTEM_BUS_ADDRESS`` honoured)."""
        address = address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
        try:
            bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
        except ValueError as err:  # dbus-fast's InvalidAddressError: not an address at all
            raise ClientError(
                "org.freedesktop.DBus.Error.BadAddress",
                f"{address} is not a D-Bus address ({err}); fix DBUS_SYSTEM_BUS_ADDRESS",
            ) from None
        except (OSError, DBusError, EOFError) as err:
            where = address or "the system bus"
            raise ClientError(
                "org.freedesktop.DBus.Error.NoServer", f"cannot connect to {where}: {err}"
            ) from None
        return cls(bus)

    def close(self) -> None:
        self.bus.disconnect()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # --- calls -------------------------------------------------------------------------

    async def call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | tuple[Any, ...] = (),
        *,
        destination: str = BUS_NAME,
        timeout: float | None = None,
        raw: bool = False,
    ) -> Any:
        """Call a method; return its single value (or list of values, or None), its
        strings made printable unless ``raw`` or one of the ``DOCUMENTS``."""
        reply = await self._reply(
            Message(
                destination=destination,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=list(body),
            ),
            timeout,
        )
        body_ = unwrap(reply.body, raw or (interface, member) in DOCUMENTS)
        if not body_:
            return None
        return body_[0] if len(body_) == 1 else body_

    async def _reply(self, msg: Message, timeout: float | None = None) -> Message:
        """Send ``msg``; its reply, or ClientError."""
        member = msg.member
        try:
            call = self.bus.call(msg)
            reply = await (asyncio.wait_for(call, timeout) if timeout else call)
        except (OSError, EOFError) as err:
            raise ClientError(
                "org.freedesktop.DBus.Error.Disconnected", f"lost the bus connection: {err}"
            ) from None
        except TimeoutError:
            raise ClientError(
                "org.freedesktop.DBus.Error.NoReply", f"{member}: no reply within {timeout} s"
            ) from None
        if reply.message_type is MessageType.ERROR:
            text = reply.body[0] if reply.body else reply.error_name
            raise ClientError(reply.error_name or "Failed", str(text))
        return reply

    def call_ordered(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str,
        body: list[Any],
        on_result: Callable[[Any, ClientError | None], None],
        raw: bool = False,
    ) -> None:
        """Call a method; ``on_result(value, error)`` runs in message order, between the
        signals received before and after the reply. (An awaited call resumes only after
        the signals that followed its reply were handled, so a snapshot read that way
        would overwrite newer news.) ``value`` is the single value, or the list of values
        of a method with several; strings made printable unless ``raw``."""

        def on_reply(reply: Message | None, err: Exception | None) -> None:
            if err is not None or reply is None:
                on_result(None, ClientError("org.freedesktop.DBus.Error.Disconnected", str(err)))
            elif reply.message_type is MessageType.ERROR:
                text = reply.body[0] if reply.body else reply.error_name
                on_result(None, ClientError(reply.error_name or "Failed", str(text)))
            elif len(reply.body) > 1:
                on_result(unwrap(reply.body, raw), None)
            else:
                on_result(unwrap(reply.body[0], raw) if reply.body else None, None)

        msg = Message(
            destination=BUS_NAME,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body,
        )
        self.bus._call(msg, on_reply)

    async def manager(self, member: str, signature: str = "", *args: Any) -> Any:
        return await self.call(ROOT, MANAGER, member, signature, args)

    async def get_config(self) -> dict[str, Any]:
        """The daemon's configuration, as it is: its strings are not made printable (it is
        edited and sent back); whoever prints one of them uses :func:`printable`."""
        return json.loads(await self.manager("GetConfig") or "{}")

    async def get_all(self, path: str, interface: str) -> dict[str, Any]:
        return await self.call(path, PROPERTIES, "GetAll", "s", [interface])

    async def managed_objects(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every object below the root. For a catalog too big for one D-Bus message the
        daemon answers TooLarge; then the same dict is read in pages (ListModels,
        ListPools, ListJobs): not one snapshot in time, but every object that existed
        throughout the reading, each as it was when its page was read."""
        try:
            return await self.call(ROOT, OBJECT_MANAGER, "GetManagedObjects")
        except ClientError as err:
            if err.name != TOO_LARGE:
                raise
        objects: dict[str, dict[str, dict[str, Any]]] = {}
        for path, props in await self.manager("ListPools"):
            objects[path] = {POOL: props}
        for path, props in await self.manager("ListJobs"):
            objects[path] = {JOB: props}
        async for path, props in self.models():
            objects[path] = {MODEL: props}
        return objects

    async def list_models(
        self, after: str = "", limit: int = 0, **filters: str
    ) -> tuple[int, list[tuple[str, dict[str, Any]]], str]:
        """One page of ListModels: (how many match, [(path, properties)...], the cursor
        for the next page: the last name, as sent, or "" after the last page)."""
        if after:
            filters["after"] = after
        args = {k: Variant("s", v) for k, v in filters.items()}
        reply = await self._reply(
            Message(
                destination=BUS_NAME,
                path=ROOT,
                interface=MANAGER,
                member="ListModels",
                signature="uua{sv}",
                body=[0, limit, args],
            )
        )
        total, page = reply.body
        cursor = page[-1][1]["Name"].value if page else ""
        return total, [(path, _printable_props(props)) for path, props in page], cursor

    async def models(self, **filters: str):
        """Every model matching ``filters`` (see ListModels), page by page."""
        after = ""
        while True:
            _, page, after = await self.list_models(after, 0, **filters)
            for item in page:
                yield item
            if not after:
                return

    # --- typed shortcuts ---------------------------------------------------------------

    async def promote(self, model: str, pool: str = "", reload: bool = False) -> str:
        if reload:
            options = {"reload": Variant("b", True)}
            return await self.manager("PromoteWithOptions", "ssa{sv}", model, pool, options)
        return await self.manager("Promote", "ss", model, pool)

    async def demote(self, model: str) -> str:
        return await self.manager("Demote", "s", model)

    async def pin(self, model: str, pool: str) -> str:
        return await self.manager("Pin", "ss", model, pool)

    async def unpin(self, model: str) -> None:
        await self.manager("Unpin", "s", model)

    async def add_remote_pool(self, name: str, entry: dict[str, Any]) -> None:
        """Add ``remoteTiers.hosts.<name>`` through SetConfig, which validates it (and
        refuses a bad host, address or size by name, saving nothing)."""
        data = await self.get_config()
        hosts = data.setdefault("remoteTiers", {}).setdefault("hosts", {})
        if name in hosts or any(p.get("name") == name for p in data.get("pools", [])):
            raise ClientError("InvalidArgument", f"a pool named {name!r} already exists")
        hosts[name] = entry
        await self.manager("SetConfig", "s", json.dumps(data))

    async def pool_call(self, path: str, member: str, signature: str = "", *args: Any) -> Any:
        return await self.call(path, POOL, member, signature, args)

    async def cancel(self, job_path: str) -> None:
        await self.call(job_path, JOB, "Cancel")

    # --- signals -----------------------------------------------------------------------

    async def subscribe(self) -> None:
        """Receive the daemon's signals (once per connection; before the call they follow)."""
        if self._subscribed:
            return
        rule = f"type='signal',sender='{BUS_NAME}',path_namespace='{ROOT}'"
        await self.call(
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "AddMatch",
            "s",
            [rule],
            destination="org.freedesktop.DBus",
        )
        self._subscribed = True

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _dispatch(self, msg: Message) -> bool:
        if msg.message_type is MessageType.SIGNAL:
            for listener in list(self._listeners):
                listener(msg)
        return False

    async def follow_job(
        self,
        path: str,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
    ) -> JobResult:
        """Follow a job to its end by signals. ``subscribe()`` must have run before the call
        that returned ``path``, so no signal can be missed."""
        if not self._subscribed:
            raise RuntimeError("follow_job needs subscribe() before the job was started")
        props: dict[str, Any] = {}
        done: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()

        def on_signal(msg: Message) -> None:
            if msg.path != path or done.done():
                return
            body = unwrap(msg.body)
            if msg.member == "PropertiesChanged" and body[0] == JOB:
                props.update(body[1])
                if on_update is not None:
                    on_update(dict(props))
            elif msg.member == "Completed" and msg.interface == JOB:
                done.set_result((bool(body[0]), str(body[1])))

        snapshot: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_current(value: Any, err: ClientError | None) -> None:
            # Runs in message order, between the signals around it: the snapshot replaces
            # what older signals said and is itself updated by the newer ones.
            if not snapshot.done():
                snapshot.set_result(None)  # on error, a Completed seen earlier still stands
            if err is not None:
                if not done.done():
                    gone = err.name in ("org.freedesktop.DBus.Error.UnknownObject",
                                        "org.freedesktop.DBus.Error.UnknownMethod")  # fmt: skip
                    done.set_exception(
                        ClientError("Failed", f"job {path} is gone: it ended long ago")
                        if gone
                        else err
                    )
                return
            props.update(value)
            job = Job.from_props(path, value)
            if not done.done() and "State" in value and not job.running:
                done.set_result((job.state == "succeeded", job.message))
            elif on_update is not None:
                on_update(dict(props))

        remove = self.add_listener(on_signal)
        try:
            self.call_ordered(path, PROPERTIES, "GetAll", "s", [JOB], on_current)
            both = asyncio.gather(done, snapshot)  # the snapshot may trail a quick Completed
            (success, message), _ = await (asyncio.wait_for(both, timeout) if timeout else both)
        finally:
            remove()
        return JobResult(path, success, message, props)
