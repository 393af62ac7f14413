"""What a plan runs its commands through: the Runner protocol and a command's result.

Below plan.py and sysfs.py, which both use a Runner (the implementations, local and SSH,
are in runners.py), so neither has to import the other for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    """Runs argv lists on one host and reads small files there (sysfs, configfs)."""

    name: str  # for messages: "local", "root@10.0.0.2:22"

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Completed: ...

    def read_text(self, path: str) -> str | None:
        """The file's text, or None if it does not exist."""
        ...

    def listdir(self, path: str) -> list[str]:
        """Entry names, or [] if the directory does not exist."""
        ...
