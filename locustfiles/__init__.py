"""Locust load for llama.cpp's server and OpenAI-compatible servers: users, the stepped shape, per-request records.

Run a locustfile with plain Locust (`locust -f locustfiles/native.py --host URL`) or through `llamasys load`.
Modules whose name starts with `_` are the machinery the locustfiles share (Locust skips them when given the
directory); this package root imports nothing from Locust, so the harness can read the record schema and the
table of users without gevent patching its process.
"""

from __future__ import annotations

from bench.apis import LOCUSTFILES, USER_KINDS, UserKind
from bench.records import RequestRecord, StepRecord, read_records
from locustfiles._steps import EXIT_ABORTED

__all__ = ["EXIT_ABORTED", "LOCUSTFILES", "USER_KINDS", "RequestRecord", "StepRecord", "UserKind", "read_records"]
