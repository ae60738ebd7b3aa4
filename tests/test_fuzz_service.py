"""Schema-driven fuzzing: schemathesis reads the running service's own OpenAPI document and sends what it allows
(positive mode) and what it forbids (negative mode) to every operation of a real uvicorn server on 127.0.0.1
serving the shipped model. Every response must be a non-5xx, with a status, content type and body that the
schema documents. FUZZ_EXAMPLES raises the examples per operation and mode (docs/service.md used 300)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import pytest

from service.settings import Settings
from tests.helpers import running_server

schemathesis = pytest.importorskip("schemathesis", reason="fuzzing needs the dev extra: pip install -e '.[dev]'")
hypothesis = pytest.importorskip("hypothesis", reason="fuzzing needs the dev extra: pip install -e '.[dev]'")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))  # per operation and mode: ~10 s in all on 2 busy cores
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def base_url(shipped_checkpoint) -> Iterator[str]:
    settings = Settings(checkpoint=shipped_checkpoint, max_upload_bytes=2 * 1024 * 1024, max_pixels=4_000_000,
                        upload_timeout_s=2.0, max_length=12)
    with running_server(settings) as url:
        yield url


def fuzz(operation, url: str, mode: GenerationMode) -> tuple[Counter, list[str]]:
    """Run `EXAMPLES` generated cases of one operation; returns status counts and the failures (check messages),
    all collected rather than stopping at the first so the report shows everything found."""
    statuses: Counter = Counter()
    failures: list[str] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        try:
            response = case.call_and_validate(base_url=url, checks=CHECKS, timeout=30)
            statuses[response.status_code] += 1
        except Exception as exc:  # a failed check: keep it, go on fuzzing
            statuses["failed"] += 1
            failures.append(f"{operation.label} ({mode.value}): {str(exc)[:400]}")

    try:
        run()
    except Unsatisfiable:  # negative mode of an operation without parameters: nothing can be made invalid
        pass
    return statuses, failures


@pytest.fixture
def ieee_floats() -> Iterator[None]:
    """Captioning on CPU flushes subnormal floats to zero on the thread that ran it (`prepare_cpu_inference`), and
    an earlier in-process training leaves that on pytest's thread; hypothesis then refuses to draw the floats of
    the schema. Fuzz with IEEE floats and put the state back after."""
    torch = pytest.importorskip("torch")
    flushed = (2.2250738585072014e-308 / 2) == 0  # the smallest normal float, halved: 0 only when flushed
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(flushed)


def test_every_operation_survives_schema_driven_fuzzing(base_url, ieee_floats):
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/captions", "POST /v1/previews", "GET /v1/stats",
                                               "GET /healthz", "GET /readyz"}
    report, failures = {}, []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            statuses, found = fuzz(operation, base_url, mode)
            report[f"{operation.label} {mode.value}"] = dict(statuses)
            failures += found
    print("\nfuzz cases by operation, mode and status:", report)
    print("cases run:", sum(sum(v for k, v in s.items() if k != "failed") for s in report.values()) + len(failures),
          "failures:", len(failures))
    assert not failures, "\n".join(failures)
    captions = report["POST /v1/captions positive"]
    assert captions.get(200, 0) > 0 and any(400 <= s < 500 for s in report["POST /v1/captions negative"] if
                                            isinstance(s, int))  # both real captions and refusals were fuzzed
