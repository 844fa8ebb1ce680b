"""schemathesis against the server's own /openapi.json (issue 20): positive and negative bodies for every
operation. No answer may be a 5xx; every answer must match the document (status, content type, schema); bodies
that break the document must be refused. Meanwhile 4 seeded victim streams run again and again, and each must
give the text it gives alone. CI runs a small bound; the README's figures come from a large one:

    GEMMA4_FUZZ_EXAMPLES=200 .venv/bin/python -m pytest -q -s tests/test_server_fuzz.py
"""
import asyncio
import os
import shutil
import subprocess
import sys
import threading

import pytest

pytest.importorskip("schemathesis")

from test_server import start  # noqa: E402
from test_server_hardening import KEY, victim  # noqa: E402

from gemma4.llm import LLM  # noqa: E402
from gemma4.server.app import create_app  # noqa: E402

EXAMPLES = int(os.environ.get("GEMMA4_FUZZ_EXAMPLES", "10"))
SEED = os.environ.get("GEMMA4_FUZZ_SEED", "20")
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance," \
         "response_headers_conformance,negative_data_rejection"


def test_schemathesis_positive_and_negative(tmp_path):
    cli = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
    if cli is None:
        pytest.skip("the schemathesis command is not installed")
    srv, url = start(create_app(LLM(), "tiny", api_key=KEY))
    alone = [asyncio.run(victim(url, i)) for i in range(4)]
    stop, rounds, harmed = threading.Event(), [0], []

    def victims():  # rounds of 4 victims for as long as the fuzzer runs
        while not stop.is_set():
            async def one_round():
                return await asyncio.gather(*(victim(url, i) for i in range(4)))
            got = asyncio.run(one_round())
            harmed.extend(i for i, (g, a) in enumerate(zip(got, alone)) if g != a)
            rounds[0] += 1

    thread = threading.Thread(target=victims)
    thread.start()
    try:
        r = subprocess.run([cli, "run", url + "/openapi.json", "--mode", "all", "--max-examples", str(EXAMPLES),
                            "--checks", CHECKS, "--header", f"Authorization: Bearer {KEY}", "--seed", SEED,
                            "--workers", "1", "--request-timeout", "120", "--generation-database", "none",
                            "--no-color", "--report", "junit",
                            "--report-junit-path", str(tmp_path / "junit.xml")],
                           capture_output=True, text=True, timeout=3000, cwd=tmp_path,  # its caches go there
                           env={**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
                                "PYTHONPATH": os.path.dirname(__file__)})
    finally:
        stop.set()
        thread.join()
        srv.should_exit = True
    summary = r.stdout[r.stdout.rfind("SUMMARY"):] if "SUMMARY" in r.stdout else r.stdout[-3000:]
    print(f"\nschemathesis, {EXAMPLES} examples per operation and mode, seed {SEED}:\n{summary}\n"
          f"victim rounds {rounds[0]}, victims harmed {len(harmed)}")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert rounds[0] >= 1 and harmed == []
