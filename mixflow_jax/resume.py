"""Resumable jobs (``mixflow sample``'s shards, ``mixflow encode``'s rows): a relaunch
continues a job only with the arguments it was started with, which the job records (as
JSON) beside its partial output."""

from __future__ import annotations

from typing import Any


def differing_fields(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """The keys, sorted, whose values differ between the record a job stored and the one a
  relaunch would store (a key present in only one of them differs)."""
  return sorted(key for key in set(stored) | set(current)
                if stored.get(key) != current.get(key))
