"""What the per-request record costs on Locust's hot path: the dataclass it is against the same record in pydantic.

Every finished request builds one `RequestRecord` and serialises it for the JSONL sink (through Locust's message
channel). This times build + serialise per record for the dataclass the locustfiles use and for a pydantic model
with the same fields, with a realistic payload (768 inter-token gaps), and prints microseconds per record.

    .venv/bin/python benchmarks/record_cost.py [--records 20000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_serializer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.records import RequestRecord  # noqa: E402


class PydanticRequestRecord(BaseModel):
    user_id: str
    seq: int
    api: str
    route: str
    sent_at: float
    ended_at: float
    prompt_tokens_asked: int
    output_tokens_asked: int
    ok: bool
    error: str | None = None
    status: int = 0
    step: int | None = None
    users: int | None = None
    epoch: int | None = None
    run: str | None = None
    measured: bool = False
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = Field(default_factory=list)
    token_events: int = 0
    server_timings: dict[str, Any] | None = None
    pid: int | None = None
    kind: str = "request"

    @field_serializer("itl_s")
    def _microseconds(self, itl: list[float]) -> list[float]:
        return [round(x, 6) for x in itl]  # the same output as the dataclass's to_json


def fields(n_tokens: int) -> dict[str, Any]:
    return dict(
        user_id="0123456789abcdef", seq=3, api="native", route="/completion", sent_at=1.7e9, ended_at=1.7e9 + 40,
        prompt_tokens_asked=2560, output_tokens_asked=768, ok=True, status=200, step=2, users=4, epoch=3, run="r",
        measured=True, prompt_tokens=2560, output_tokens=768, ttft_s=1.5, tpot_s=0.05, e2e_s=40.0,
        itl_s=[0.0512345678] * (n_tokens - 1), token_events=n_tokens,
        server_timings={"prompt_n": 2560, "prompt_ms": 1400.0, "predicted_n": 768, "predicted_ms": 38000.0},
        pid=1234,
    )  # fmt: skip


def per_record_us(make, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        make()
    return (time.perf_counter() - started) / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--tokens", type=int, default=768)
    args = parser.parse_args()
    data = fields(args.tokens)

    def dataclass_path() -> str:
        return json.dumps(RequestRecord(**data).to_json(), separators=(",", ":"))

    def pydantic_path() -> str:
        record = PydanticRequestRecord(**data)
        return json.dumps(record.model_dump(), separators=(",", ":"))

    for warm in (dataclass_path, pydantic_path):
        per_record_us(warm, 200)
    figures = {
        "records": args.records,
        "tokens_per_record": args.tokens,
        "dataclass_us_per_record": round(per_record_us(dataclass_path, args.records), 1),
        "pydantic_us_per_record": round(per_record_us(pydantic_path, args.records), 1),
    }
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
