"""Regression test for dbus-fast's EAGAIN flaw: a burst of signals that fills the socket
send buffer must not take a service off the bus.

The control run uses plain dbus-fast and must lose its connection under the same burst:
if it ever stops doing so (a fixed library, a bigger buffer), this test says so instead of
passing without proving anything.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import tempfile
from pathlib import Path

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method, signal

from speedloaderd.bus.server import SystemBus

BURST = 5000
PAYLOAD = "x" * 8192


class Noisy(ServiceInterface):
    def __init__(self) -> None:
        super().__init__("org.speedloader.Test.Noisy")

    @signal()
    def Tick(self) -> s:  # noqa: F821 (a D-Bus signature)
        return PAYLOAD

    @method()
    def Ping(self) -> s:  # noqa: F821
        return "pong"


@pytest.fixture
def bus_address():
    """A private bus (session type: this test is about socket buffers, not policy)."""
    d = Path(tempfile.mkdtemp(prefix="sl-burst-", dir="/tmp"))
    address = f"unix:path={d}/bus"
    proc = subprocess.Popen(
        [
            "dbus-daemon",
            "--session",
            "--nofork",
            "--nopidfile",
            f"--address={address}",
            "--print-address=1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout.readline().startswith("unix:")
        yield address
    finally:
        proc.terminate()
        proc.wait()
        subprocess.run(["rm", "-rf", str(d)])


async def burst_then_ping(address: str, bus_class: type[MessageBus]) -> tuple[bool, str | None]:
    """Emit BURST signals without yielding, then ask the service something. Returns whether
    the service's connection survived and what it answered."""
    service = await bus_class(bus_address=address, bus_type=BusType.SESSION).connect()
    client = await MessageBus(bus_address=address, bus_type=BusType.SESSION).connect()
    try:
        iface = Noisy()
        service.export("/test", iface)
        try:
            for _ in range(BURST):
                iface.Tick()
        except OSError:  # plain dbus-fast: emitting on the connection it just dropped
            return False, None
        reply = await asyncio.wait_for(
            client.call(
                Message(
                    destination=service.unique_name,
                    path="/test",
                    interface="org.speedloader.Test.Noisy",
                    member="Ping",
                )
            ),
            timeout=30,
        )
        answer = reply.body[0] if reply.message_type is MessageType.METHOD_RETURN else None
        return service.connected, answer
    finally:
        client.disconnect()
        if service.connected:
            service.disconnect()
        await asyncio.sleep(0)  # let the library finish its own teardown callbacks


def test_signal_burst_keeps_the_service_on_the_bus(bus_address):
    survived, answer = asyncio.run(burst_then_ping(bus_address, SystemBus))
    assert survived and answer == "pong"


def test_control_plain_dbus_fast_drops_off_the_bus(bus_address):
    async def control():
        # The broken library leaves futures holding its BlockingIOError; they are the
        # symptom under test, not news: collect them here instead of at interpreter exit.
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: None)
        try:
            return await burst_then_ping(bus_address, MessageBus)
        finally:
            gc.collect()

    survived, answer = asyncio.run(control())
    assert not survived and answer is None, (
        "plain dbus-fast survived the burst: the regression test above no longer proves "
        "the EAGAIN fix; make the burst bigger or retire the workaround"
    )
