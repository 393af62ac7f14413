"""Write the published introspection XML (dbus/<interface>.xml) from the interface classes.

``python3 -m speedloaderd.bus.introspect dbus/`` regenerates the files; a test checks that
the running daemon exports exactly what they say, so a change to the API is a visible
change to those files.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from dbus_fast.service import ServiceInterface

_HEADER = (
    '<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
    ' "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n'
)


def interfaces() -> list[ServiceInterface]:
    from ..jobs import Job
    from .objects import JobInterface, ManagerInterface, ModelInterface, PoolInterface

    return [
        ManagerInterface(None),  # type: ignore[arg-type]
        PoolInterface(None, "x"),  # type: ignore[arg-type]
        ModelInterface(None, "x"),  # type: ignore[arg-type]
        JobInterface(None, Job("promote")),  # type: ignore[arg-type]
    ]


def interface_xml(iface: ServiceInterface) -> str:
    node = ET.Element("node")
    node.append(iface.introspect().to_xml())
    ET.indent(node)
    return _HEADER + ET.tostring(node, encoding="unicode") + "\n"


def write_all(directory: Path) -> list[Path]:
    written = []
    for iface in interfaces():
        path = directory / f"{iface.name}.xml"
        path.write_text(interface_xml(iface))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "dbus")):
        print(p)
