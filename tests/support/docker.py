"""docker/Dockerfile as data, and an interpreter that imports only what the image holds."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

from packaging.utils import canonicalize_name

from support import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
RUNTIME = ROOT / "requirements" / "runtime.txt"
LOCK = ROOT / "requirements" / "lock.txt"
UID = 10001
# The model/export stack, the local Triton server and the KServe SDK stay out of the images.
NOT_IN_RUNTIME = {
    "torch",
    "torchvision",
    "compressai",
    "timm",
    "onnx",
    "onnxscript",
    "triton",
    "nvidia-pytriton",
    "kserve",
}
# Project packages the images run; nec_models / nec_export (PyTorch) must never be imported.
PROJECT_MODULES = {"nec_serve", "nec_wrapper", "nec_controller"}


# ------------------------------------------------------------------------------ parsing


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line:
            op, _, args = line.partition(" ")
            out.append((op.upper(), " ".join(args.split())))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def stages(text: str) -> dict[str, dict]:
    """name -> {"base": FROM argument, "ops": [(op, args), ...]}, in file order."""
    args: dict[str, str] = {}
    result: dict[str, dict] = {}
    current = None
    for op, rest in instructions(text):
        if op == "ARG" and current is None:
            name, _, default = rest.partition("=")
            args[name] = default
        elif op == "FROM":
            m = re.fullmatch(r"(\S+) AS (\S+)", rest, re.IGNORECASE)
            assert m, f"every stage is named: FROM {rest}"
            base = re.sub(r"\$\{(\w+)\}", lambda g: args[g.group(1)], m.group(1))
            current = result.setdefault(m.group(2), {"base": base, "ops": []})
        else:
            assert current is not None, f"{op} before the first FROM"
            current["ops"].append((op, rest))
    return result


def effective(all_stages: dict[str, dict], name: str, op: str) -> str | None:
    """The last ``op`` (USER, ENTRYPOINT, CMD ...) in effect in a stage, following its bases."""
    chain = []
    while name in all_stages:
        chain.append(all_stages[name])
        name = all_stages[name]["base"]
    for stage in chain:
        for this, rest in reversed(stage["ops"]):
            if this == op:
                return rest
    return None


def pins(path: Path) -> dict[str, str]:
    """Canonical name -> the ``name==version`` line, for a requirements file of exact pins."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and " " not in line, f"{path.name}: not an exact pin: {line!r}"
            out[canonicalize_name(name)] = line
    return out


# A meta-path finder that refuses every top-level module found in site-packages that no allowed
# distribution provides (and the PyTorch-only project packages): the image's site-packages,
# emulated. The stdlib and the project packages the image runs are left alone.
GUARD = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, importlib.metadata, site, sys
    from packaging.utils import canonicalize_name
    ALLOWED_DISTS = set(sys.argv[1].split(","))
    PROJECT = set(sys.argv[2].split(","))
    NOT_PROJECT = {"nec_models", "nec_export"}  # in the wheel, but PyTorch-only
    SITE = tuple(site.getsitepackages())
    OWNERS = importlib.metadata.packages_distributions()
    class Guard(importlib.abc.MetaPathFinder):
        refused = set()
        def refuse(self, name):
            Guard.refused.add(name)
            raise ModuleNotFoundError(f"not in the image: {name}", name=name)
        def find_spec(self, name, path=None, target=None):
            if path is not None or name in PROJECT:
                return None  # a submodule: its top-level package was checked
            if name in NOT_PROJECT:
                self.refuse(name)
            dists = OWNERS.get(name)
            if dists and all(canonicalize_name(d) in ALLOWED_DISTS for d in dists):
                return None
            spec = importlib.machinery.PathFinder.find_spec(name)
            if spec is not None:
                where = [spec.origin] + list(spec.submodule_search_locations or [])
                if any(str(w).startswith(SITE) for w in where):
                    self.refuse(name)  # installed here by a distribution the image lacks
            return None  # the stdlib, or nothing at all
    sys.meta_path.insert(0, Guard())
    """
)


def run_with_runtime_packages(code: str, *args: str, timeout: float = 120.0):
    """Run ``code`` in a fresh interpreter that can import only the stdlib, the distributions
    of runtime.txt and nec_serve / nec_wrapper / nec_controller. ``sys.argv[3:]`` = args."""
    dists = ",".join(sorted(pins(RUNTIME)))
    script = GUARD + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script, dists, ",".join(sorted(PROJECT_MODULES)), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
