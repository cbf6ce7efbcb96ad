"""The main job end to end (slow, --quick): vLLM on CPU + lmcache server with blockstore as its L2 tier,
then the blend scenario.

Prefix reuse, on the ~100 M-parameter speed model: after the server's RAM tier is cleared, and again after
both processes restart, the prompt tokens vLLM takes from LMCache must come from blockstore (the server's
L2 lookup counter), and the greedy token ids must equal the run without any cache (top-5
log-probabilities within 1e-5); the adapter's status must show up in the server's GET /status.

Blend, on the trained model: the blend connector (first in vLLM's MultiConnector, LMCache's MP connector
second) must have served the mixes blended, by its own counters, with greedy first tokens agreeing with
full prefill (the job's own checks, which make it exit 1 otherwise, are asserted here too)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytest.importorskip("lmcache")

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^(baseline \(no cache\)|cold \(server empty\)|L2 after L1 clear|L2 after restart)\s+(\d+)\s+"
                 r"([\d.]+)%\s+(\S+)\s+(\S+)\s+.*\s(yes|no|\(ref\))\s+(\S+)\s*$")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_main_job_serves_identical_outputs_from_blockstore(tmp_path: Path) -> None:
    env = dict(os.environ, DO_NOT_TRACK="1", VLLM_NO_USAGE_STATS="1", LMCACHE_TRACK_USAGE="false",
               PYTHONHASHSEED="0")
    # free ports: another server on the defaults (5555, 8085) must not fail the test
    ports = ["--port", str(_free_port()), "--http-port", str(_free_port()), "--metrics-port", str(_free_port())]
    proc = subprocess.run([sys.executable, "-m", "jobs.main_job", "--quick", "--work", str(tmp_path / "work"), *ports],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    rows = {m.group(1): m.groups()[1:] for line in proc.stdout.splitlines() if (m := ROW.match(line))}
    assert set(rows) >= {"baseline (no cache)", "L2 after L1 clear", "L2 after restart"}, proc.stdout
    for name in ("L2 after L1 clear", "L2 after restart"):
        served, _rate, from_l1, from_l2, identical, dlogp = rows[name]
        assert int(served) > 0, (name, proc.stdout)
        assert from_l1 in ("0", "n/a") and from_l2 not in ("0", "n/a") and int(from_l2) > 0, (name, proc.stdout)
        assert identical == "yes", (name, proc.stdout)
        assert float(dlogp) <= 1e-5, (name, proc.stdout)
    assert "blockstore" in proc.stdout and "space amplification" in proc.stdout
    # the adapter's own status, as the server's GET /status reports it
    status = re.search(r"^  blockstore at .*: healthy (\w+), (\d+) records", proc.stdout, re.M)
    assert status and status.group(1) == "True" and int(status.group(2)) > 0, proc.stdout
    assert re.search(r"loads \d+ keys, hit ratio 1\.00", proc.stdout), proc.stdout
    # the TTFT comparison is reported (a timing: reported, not asserted)
    assert re.search(r"^TTFT median: without reuse \(baseline\) [\d.]+ ms; L2 after L1 clear [\d.]+ ms \([\d.]+x",
                     proc.stdout, re.M), proc.stdout
    # the blend scenario: served blended by the connector's own count, and its checks passed
    served = re.search(r"^mixes: (\d+)/(\d+) prompt tokens served blended .*connector: (\d+) requests blended, "
                       r"(\d+) tokens written", proc.stdout, re.M)
    assert served and int(served.group(1)) == int(served.group(4)) > 0 and int(served.group(3)) > 0, proc.stdout
    # blockstore's Prometheus endpoint in the server, scraped while the job ran (issue 17)
    scraped = re.search(r"blockstore metrics \(scraped at :\d+ during the job\): (\d+) L2 hits, (\d+) records",
                        proc.stderr)
    assert scraped and int(scraped.group(1)) > 0 and int(scraped.group(2)) > 0, proc.stderr[-4000:]
    assert re.search(r"^check: PASS  blockstore's metrics endpoint scraped", proc.stdout, re.M), proc.stdout
    blend_checks = re.findall(r"^check: (PASS|FAIL)  blend: ", proc.stdout, re.M)
    assert len(blend_checks) == 3 and set(blend_checks) == {"PASS"}, proc.stdout
