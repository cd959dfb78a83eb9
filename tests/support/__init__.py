"""Helpers shared by the test modules (no test module imports another one).

``tests/`` is on ``sys.path`` (pytest's rootdir conftest), so a test imports these as
``from support import ROOT`` or ``from support.kafka_s3 import Flow``:

* :mod:`support.kafka_s3` — a workflow's topics, bucket and config on the real broker and S3
  server, a wrapper step handler for it, a NAIP tile archive, a polling wait;
* :mod:`support.k8s` — the pinned kustomize and CRDs (``scripts/fetch_schemas.sh``), rendering
  of a copy of ``k8s/``, workflow messages, and a server-side dry run on the real API server;
* :mod:`support.docker` — ``docker/Dockerfile`` parsing and an interpreter limited to the
  image's packages.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

#: The repository root.
ROOT = Path(__file__).resolve().parents[2]
#: The sample data in the checkout (data/samples/README.md).
DATA = ROOT / "data" / "samples"
#: An SSL4EO-S12 sample (10 of its bands are the RVQ family's input).
SSL4EO = "ssl4eo_s12/ssl4eos12_val_0080717_0.tif"
SSL4EO_BANDS = [2, 3, 4, 5, 6, 7, 8, 9, 11, 12]


def run_py(code: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter (where kserve may be imported)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
