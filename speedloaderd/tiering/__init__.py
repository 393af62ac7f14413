"""Automatic tiering (issue 13): the policy that decides, from the uses it is told of, which
models to keep in RAM. Pure code (no D-Bus, no I/O, no clock); see policy.py."""

from .history import StateError
from .policy import Access, Action, Evict, Model, Policy, PoolRoom, Promote
from .settings import POLICIES, Settings

__all__ = [
    "POLICIES",
    "Access",
    "Action",
    "Evict",
    "Model",
    "Policy",
    "PoolRoom",
    "Promote",
    "Settings",
    "StateError",
]
