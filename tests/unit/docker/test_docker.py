"""docker/Dockerfile, .dockerignore and requirements/runtime.txt, checked without a Docker engine.

No image can be built here (no Docker engine), so this checks what the build depends on: the
stages, user, entrypoint and commands of the Dockerfile; that the build context is exactly
what it copies; that runtime.txt pins exactly the lock's versions of exactly the dependency
closure the images need (and no PyTorch); and that the wrapper and controller import and
build their CLI with nothing but those packages (a subprocess that refuses every other
third-party module, as the image would).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support import ROOT
from support.docker import (
    DOCKERFILE,
    DOCKERIGNORE,
    LOCK,
    NOT_IN_RUNTIME,
    RUNTIME,
    UID,
    effective,
    pins,
    run_with_runtime_packages,
    stages,
)


def closure(roots: list[Requirement]) -> set[str]:
    """Canonical names of the distributions ``roots`` need here (Linux, CPython 3.11),
    from the metadata of the installed distributions."""
    seen: dict[str, set[str]] = {}
    stack = [(r.name, set(r.extras)) for r in roots]
    while stack:
        name, extras = stack.pop()
        key = canonicalize_name(name)
        if key in seen and extras <= seen[key]:
            continue
        seen[key] = seen.get(key, set()) | extras
        for text in md.distribution(name).requires or []:
            req = Requirement(text)
            envs = [{"extra": ""}] + [{"extra": e} for e in seen[key]]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                stack.append((req.name, set(req.extras)))
    return set(seen)


def runtime_roots() -> list[Requirement]:
    """The ``# roots:`` of runtime.txt, nec-serve's own requirements read from pyproject.toml."""
    line = next(x for x in RUNTIME.read_text().splitlines() if x.startswith("# roots:"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    roots = []
    for item in line.split(":", 1)[1].split():
        req = Requirement(item)
        if canonicalize_name(req.name) == "nec-serve":
            roots += [Requirement(r) for r in project["dependencies"]]
            for extra in req.extras:
                roots += [Requirement(r) for r in project["optional-dependencies"][extra]]
        else:
            roots.append(req)
    return roots


@pytest.fixture(scope="module")
def dockerfile() -> dict[str, dict]:
    return stages(DOCKERFILE.read_text())


# ------------------------------------------------------------------------------ Dockerfile


def test_stages_and_bases(dockerfile):
    assert list(dockerfile) == ["builder", "runtime", "controller", "wrapper"]
    assert dockerfile["builder"]["base"] == dockerfile["runtime"]["base"] == "python:3.11-slim"
    assert dockerfile["controller"]["base"] == dockerfile["wrapper"]["base"] == "runtime"


@pytest.mark.parametrize("target,command", [("wrapper", "wrapper"), ("controller", "controller")])
def test_targets_run_nec_serve_as_a_non_root_user(dockerfile, target, command):
    user = effective(dockerfile, target, "USER")
    assert user == f"{UID}:{UID}"  # numeric, so Kubernetes' runAsNonRoot can check it
    assert json.loads(effective(dockerfile, target, "ENTRYPOINT")) == ["nec-serve"]
    assert json.loads(effective(dockerfile, target, "CMD")) == [command]
    # USER is the last word on the user: nothing after it switches back.
    runtime_ops = dockerfile["runtime"]["ops"]
    user_at = runtime_ops.index(("USER", user))
    assert not any(op == "RUN" for op, _ in runtime_ops[user_at:])
    assert not any(op in ("USER", "RUN") for op, _ in dockerfile[target]["ops"])


def test_compiler_only_in_the_builder(dockerfile):
    builder = " ".join(rest for op, rest in dockerfile["builder"]["ops"] if op == "RUN")
    assert "gcc" in builder and "pip wheel" in builder and "--no-deps" in builder
    for name in ("runtime", "controller", "wrapper"):
        runs = " ".join(rest for op, rest in dockerfile[name]["ops"] if op == "RUN")
        assert "apt-get" not in runs and "gcc" not in runs, name


def test_runtime_installs_only_the_pinned_wheels(dockerfile):
    ops = dockerfile["runtime"]["ops"]
    runs = [rest for op, rest in ops if op == "RUN"]
    pip = [r for r in runs if "pip install" in r]
    assert len(pip) == 2
    assert "--no-deps" in pip[0] and "--only-binary=:all:" in pip[0]
    assert "-r /tmp/runtime.txt" in pip[0]
    assert "--no-deps /tmp/wheels/nec_serve-" in pip[1] and "pip check" in pip[1]
    copies = [rest for op, rest in ops if op == "COPY"]
    assert "requirements/runtime.txt /tmp/runtime.txt" in copies
    assert "--from=builder /wheels /tmp/wheels" in copies


def test_no_credentials_in_the_image(dockerfile):
    for name, stage in dockerfile.items():
        for op, rest in stage["ops"]:
            if op in ("ENV", "ARG", "LABEL"):
                assert not re.search(r"(KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL)", rest, re.I), rest
            if op in ("COPY", "ADD"):
                assert "k8s" not in rest and ".env" not in rest and "s3-credentials" not in rest
                assert op == "COPY", f"{name}: ADD fetches or unpacks; COPY is enough"


def test_build_context_is_exactly_what_is_copied(dockerfile):
    """.dockerignore denies everything, then allows exactly the COPY sources, which exist."""
    lines = [
        x.strip()
        for x in DOCKERIGNORE.read_text().splitlines()
        if x.strip() and not x.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {x[1:] for x in lines if x.startswith("!")}
    sources = set()
    for stage in dockerfile.values():
        for op, rest in stage["ops"]:
            if op == "COPY" and not rest.startswith("--from="):
                *srcs, _dest = rest.split()
                sources.update(s.rstrip("/") for s in srcs)
    assert sources == allowed
    for src in sources:
        assert (ROOT / src).exists(), src
    # Compiled or cached files of this checkout stay out (the builder compiles its own).
    assert {"**/*.so", "**/__pycache__"} <= set(lines)


def test_the_builder_copies_every_package_of_the_wheel_and_no_dev_tooling(dockerfile):
    """The wheel is built from pyproject's package folders: all must be in the build, and
    the dev tooling (its own distribution, dev/pyproject.toml) must not be."""
    import tomllib

    folders = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
            "package-dir"
        ].values()
    )
    copied = {
        rest.split()[0].rstrip("/")
        for op, rest in dockerfile["builder"]["ops"]
        if op == "COPY" and not rest.startswith("--from=")
    }
    assert folders <= copied, folders - copied
    assert "dev" not in copied and "dev" not in folders


# ------------------------------------------------------------------------------ runtime.txt


def test_runtime_pins_are_the_lock_pins():
    runtime, lock = pins(RUNTIME), pins(LOCK)
    assert runtime, "runtime.txt pins nothing"
    for name, line in runtime.items():
        assert lock.get(name) == line, f"{line} is not the lock's {lock.get(name)}"


def test_runtime_has_no_pytorch_or_export_stack():
    runtime = set(pins(RUNTIME))
    assert not runtime & {canonicalize_name(n) for n in NOT_IN_RUNTIME}
    assert not any(n.startswith(("nvidia-", "cuda-")) for n in runtime)


def test_runtime_is_exactly_the_dependency_closure():
    """Nothing missing (pip install --no-deps would leave a hole) and nothing extra."""
    needed = closure(runtime_roots())
    assert set(pins(RUNTIME)) == needed


# ------------------------------------------------------------------------------ imports


def test_guard_refuses_what_the_image_lacks():
    out = run_with_runtime_packages(
        """
        for name in ("torch", "compressai", "onnx", "kserve", "pytest", "nec_models", "yaml"):
            try:
                __import__(name)
            except ModuleNotFoundError:
                print("refused", name)
            else:
                print("imported", name)
        """
    )
    assert out.returncode == 0, out.stderr
    got = dict(reversed(line.split()) for line in out.stdout.splitlines())
    assert got == {
        "torch": "refused",
        "compressai": "refused",
        "onnx": "refused",
        "kserve": "refused",
        "pytest": "refused",
        "nec_models": "refused",
        "yaml": "imported",  # PyYAML is a kubernetes dependency, so it is in the image
    }


def test_wrapper_and_controller_import_with_only_the_runtime_packages():
    out = run_with_runtime_packages(
        """
        import nec_cli.main as cli
        parser = cli.build_parser()
        parser.parse_args(["wrapper", "--mode", "compress", "--model-dir", "/model",
                           "--bootstrap", "k:9092", "--namespace", "nec",
                           "--server", "http://h:80"])
        parser.parse_args(["controller", "--kubernetes", "--bootstrap", "k:9092"])
        import nec_wrapper.main, nec_wrapper.step, nec_wrapper.triggers
        import nec_controller.main, nec_controller.app, nec_controller.sources
        import nec_serve.config_store, nec_serve.serving.client, nec_serve.s3
        import nec_serve.kafka_io, nec_serve.pipeline, nec_serve.imagery, nec_serve._rans
        # what those import lazily, on the Kubernetes / --server / Kafka / S3 paths
        import tritonclient.http, tritonclient.grpc, tritonclient.utils
        import kubernetes.client, kubernetes.config, kafka, boto3, rasterio, onnxruntime
        import sys
        assert not {"torch", "compressai", "onnx", "nec_models", "nec_export"} & set(sys.modules)
        print("ok", len(Guard.refused))
        """
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")
