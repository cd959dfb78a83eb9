"""Write k8s/overlays/{gpu,cpu} from the sizing table and the family registry.

    .venv/bin/python scripts/render_k8s.py

Run it after changing nec_serve/deploy/services.py or registering a family;
tests/unit/deploy/test_deploy.py fails while the committed files differ from what it writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nec_serve.deploy.render import write_overlays

if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    for path in write_overlays(root / "k8s"):
        print(path.relative_to(root))
    sys.exit(0)
