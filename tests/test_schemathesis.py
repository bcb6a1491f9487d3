"""schemathesis against the running daemon's own /openapi.json: no 5xx, every response as
documented (positive and negative cases, on both databases)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serve_process import ServeProcess

pytestmark = pytest.mark.fault

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


# NOTE: the API is the same on both databases; the development loop checks it on SQLite.
@pytest.mark.parametrize("database_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.slow)],
                         indirect=True)
def test_the_api_matches_its_openapi_document(database_url, tmp_path, reliability):
    # NOTE: a schema-valid POST /increment may still be refused, by state the schema cannot
    # express: 409 (the total would overflow) and 422 (its Idempotency-Key was used for another
    # body). Both are documented responses of the operation.
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        '[[operations]]\ninclude-path = "/increment"\ninclude-method = "POST"\n'
        'checks.positive_data_acceptance.expected-statuses = ["202", "409", "422", "503"]\n'
    )
    with ServeProcess(database_url, interval=2, seed_count=1000) as daemon:
        daemon.start(tmp_path / "serve.log")
        done = subprocess.run(
            [str(SCHEMATHESIS), "--config-file", str(config), "run", f"{daemon.base}/openapi.json", "--checks", "all",
             "--max-examples", "50", "--seed", "1", "--no-color"],
            check=False, capture_output=True, encoding="utf-8", timeout=300, cwd=tmp_path,  # its cache stays out of the tree
            env={**os.environ, "PYTHONUTF8": "1"},  # it draws its report in box characters, whatever the locale
        )
        assert daemon.terminate() == 0
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = [
        line.strip("= ") for line in done.stdout.splitlines() if "generated" in line or "No issues" in line
    ]
    kind = "PostgreSQL" if database_url.startswith("postgresql") else "SQLite"
    reliability.record(
        f"The API matches its OpenAPI document ({kind})",
        "schemathesis (`run --checks all`, positive and negative cases, fixed seed) against "
        "`maxtwo serve` and its own /openapi.json.",
        summary or ["schemathesis exited 0"],
    )
