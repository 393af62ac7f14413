"""The dashboard's connection to speedloaderd: one snapshot, then signals; and back again
when the daemon restarts.

- At connect: subscribe to the daemon's signals and to NameOwnerChanged for its name,
  then one GetManagedObjects (+ the Manager's GetAll); for a catalog too big for one
  message (the daemon answers TooLarge), ListPools, ListJobs and ListModels page by
  page. Their replies are handled in message order, between the signals around them,
  so the snapshot neither misses a change nor overwrites a newer one.
- NameOwnerChanged with no new owner: the daemon left; everything shown goes stale and
  running jobs are gone. A new owner: the daemon is back; load a fresh snapshot.
- The bus connection itself lost: reconnect, waiting a little longer each time.

There is no timer and no polling: when nothing happens on the bus, nothing runs here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from dbus_fast import Message, Variant

from speedloader_client.client import (
    BUS_NAME,
    JOB,
    MANAGER,
    MODEL,
    OBJECT_MANAGER,
    POOL,
    PROPERTIES,
    ROOT,
    TOO_LARGE,
    Client,
    ClientError,
    unwrap,
)
from speedloader_client.records import Job

from .state import DaemonState

log = logging.getLogger(__name__)

DBUS = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
OWNER_RULE = (
    f"type='signal',sender='{DBUS}',interface='{DBUS}',member='NameOwnerChanged',arg0='{BUS_NAME}'"
)
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0)


class DaemonLink:
    """Keeps ``state`` current and tells the app when it changed.

    ``on_change()`` runs after any change to ``state``; ``on_event(kind, text)`` reports
    what a person should hear about: ``online``, ``offline``, ``bus-lost``, ``job-done``.
    """

    def __init__(
        self,
        state: DaemonState,
        address: str | None,
        on_change: Callable[[], None],
        on_event: Callable[[str, Any], None],
    ):
        self.state = state
        self.address = address
        self.on_change = on_change
        self.on_event = on_event
        self.client: Client | None = None
        self.loads = 0  # snapshots taken (1 per (re)connection of the daemon)
        self._stopping = False

    # --- running -------------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected until ``stop()``."""
        failures = 0
        while not self._stopping:
            try:
                client = await Client.connect(self.address)
            except ClientError as err:
                if failures == 0:
                    self.on_event("bus-lost", err.message)
                await asyncio.sleep(RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)])
                failures += 1
                continue
            failures = 0
            self.client = client
            try:
                await self._attach(client)
                await client.bus.wait_for_disconnect()
            except (ClientError, EOFError, OSError) as err:
                log.info("bus connection ended: %s", err)
            finally:
                self.client = None
                with contextlib.suppress(Exception):
                    client.close()
            if self._stopping:
                return
            self.state.go_offline()
            self.on_change()
            self.on_event("bus-lost", "lost the connection to the system bus; reconnecting")

    def stop(self) -> None:
        self._stopping = True
        if self.client is not None:
            self.client.close()

    async def _attach(self, client: Client) -> None:
        client.add_listener(self._on_signal)
        await client.call(DBUS_PATH, DBUS, "AddMatch", "s", [OWNER_RULE], destination=DBUS)
        await client.subscribe()
        owned = await client.call(
            DBUS_PATH, DBUS, "NameHasOwner", "s", [BUS_NAME], destination=DBUS
        )
        if owned:
            self._load(client)
        else:
            self.state.go_offline()
            self.on_change()
            self.on_event("offline", "speedloaderd is not running; waiting for it to start")

    def _load(self, client: Client) -> None:
        """Ask for the whole state; the replies are applied in message order."""
        pending: dict[str, Any] = {}

        def apply() -> None:
            if len(pending) < 2:
                return
            try:
                adopt()
            except Exception:
                log.exception("adopting the daemon's state")

        def adopt() -> None:
            objects, manager = pending["objects"], pending["manager"]
            too_large = isinstance(objects, ClientError) and objects.name == TOO_LARGE
            if too_large and not isinstance(manager, Exception):
                self._load_paged(client, manager)
                return
            if isinstance(pending["objects"], Exception) or isinstance(
                pending["manager"], Exception
            ):
                err = (
                    pending["objects"]
                    if isinstance(pending["objects"], Exception)
                    else (pending["manager"])
                )
                self.on_event("error", err)
                return
            self.state.load(pending["objects"])
            self.state.manager.update(pending["manager"])
            self.loads += 1
            self.on_change()
            self.on_event("online", self.state.manager)

        def reply_to(key: str) -> Callable[[Any, ClientError | None], None]:
            def on_result(value: Any, err: ClientError | None) -> None:
                pending[key] = err if err is not None else value
                apply()

            return on_result

        client.call_ordered(ROOT, OBJECT_MANAGER, "GetManagedObjects", "", [], reply_to("objects"))
        client.call_ordered(ROOT, PROPERTIES, "GetAll", "s", [MANAGER], reply_to("manager"))

    def _load_paged(self, client: Client, manager: dict[str, Any]) -> None:
        """A catalog too big for one GetManagedObjects: pools, jobs, then models a page at a
        time, each reply applied in message order. Signals are applied meanwhile (the state
        is live from the first page), so a page never overwrites newer news: it was read
        after every signal that came before it."""
        self.state.begin_load()
        self.state.manager.update(manager)

        def add_all(kind: str) -> Callable[[Any, ClientError | None], None]:
            def on_result(value: Any, err: ClientError | None) -> None:
                if err is not None:
                    self.on_event("error", err)
                    return
                for path, props in value:
                    self.state.changed(path, kind, props)
                self.on_change()

            return on_result

        def next_page(after: str) -> None:
            args = {"after": Variant("s", after)} if after else {}
            client.call_ordered(
                ROOT, MANAGER, "ListModels", "uua{sv}", [0, 0, args], on_page, raw=True
            )

        def on_page(value: Any, err: ClientError | None) -> None:
            if err is not None:
                self.on_event("error", err)
                return
            _total, page = value
            for path, props in page:
                self.state.changed(path, MODEL, unwrap(props))
            self.on_change()
            if page:
                next_page(page[-1][1]["Name"])  # the name as sent: the cursor
                return
            self.loads += 1
            self.on_event("online", self.state.manager)

        client.call_ordered(ROOT, MANAGER, "ListPools", "", [], add_all(POOL))
        client.call_ordered(ROOT, MANAGER, "ListJobs", "", [], add_all(JOB))
        next_page("")

    # --- signals -------------------------------------------------------------------------

    def _on_signal(self, msg: Message) -> None:
        try:
            self._handle_signal(msg)
        except Exception:  # a bug in a view must not cut the link to the daemon
            log.exception("handling %s from %s", msg.member, msg.path)

    def _handle_signal(self, msg: Message) -> None:
        member = msg.member
        if member == "NameOwnerChanged" and msg.interface == DBUS:
            if msg.body[0] != BUS_NAME:
                return
            if msg.body[2]:
                if self.client is not None:
                    self._load(self.client)
            else:
                self.state.go_offline()
                self.on_change()
                self.on_event("offline", "speedloaderd stopped; waiting for it to come back")
            return
        if not self.state.online:
            return
        body = unwrap(msg.body)  # every string in it made printable
        path = msg.path or ""  # a signal always has one (D-Bus requires it)
        if member == "PropertiesChanged" and msg.interface == PROPERTIES:
            self.state.changed(path, body[0], body[1])
        elif member == "InterfacesAdded" and msg.path == ROOT:
            self.state.add(body[0], body[1])
        elif member == "InterfacesRemoved" and msg.path == ROOT:
            self.state.remove(body[0], list(body[1]))
        elif member == "Completed" and msg.interface == JOB:
            job = self.state.completed(path, bool(body[0]), str(body[1]))
            self.on_change()
            self.on_event("job-done", job or Job(path, message=str(body[1])))
            return
        else:
            return
        self.on_change()

    # --- calls ---------------------------------------------------------------------------

    async def call(self, fn: Callable[[Client], Awaitable[Any]]) -> Any:
        """Run ``fn(client)``; raise ClientError (unreachable) when there is no connection."""
        client = self.client
        if client is None:
            raise ClientError(
                "org.freedesktop.DBus.Error.Disconnected", "not connected to the system bus"
            )
        return await fn(client)
