"""Shared fixtures (the real sample data, one tiny-model export per session, the local servers)
and the markers of the test tiers: ``make test-fast`` runs ``-m "not integration and not slow"``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import support

#: The servers a test starts, by the fixture that starts them (a test in
#: tests/integration/<component>/ is marked by its directory as well).
SERVER_FIXTURES = {
    "kafka": ("kafka",),
    "producer": ("kafka",),
    "raw_producer": ("kafka",),
    "s3": ("s3",),
    "s3_endpoint": ("s3",),
    "kube": ("kube",),
}
DIRECTORY_MARKERS = {
    "kafka_s3": ("kafka", "s3"),
    "s3": ("s3",),
    "triton": ("triton",),
    "kube": ("kube",),
}
COMPONENTS = ("kafka", "s3", "triton", "kube")


def pytest_collection_modifyitems(config, items):
    """Mark each test with the servers it starts, and ``integration`` if it starts any: by its
    directory under tests/integration/, its fixtures, or explicit marks."""
    integration = Path(__file__).resolve().parent / "integration"
    for item in items:
        names = set()
        path = Path(item.path)
        if integration in path.parents:
            names.update(DIRECTORY_MARKERS.get(path.relative_to(integration).parts[0], ()))
        for fixture in item.fixturenames:
            names.update(SERVER_FIXTURES.get(fixture, ()))
        names.update(m.name for m in item.iter_markers() if m.name in COMPONENTS)
        for name in sorted(names):
            item.add_marker(name)
        if names:
            item.add_marker("integration")


#: The sample data in the checkout (data/samples/README.md): every test reads this, so a
#: bare clone and CI run the same thing.
DATA = support.DATA
TINY = "mae_vit_compress_adapter_tiny"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The sample data, checked against its SHA256SUMS (a changed file fails the session)."""
    from nec_dev.data import open_data

    return open_data(DATA, "samples").root


@pytest.fixture(scope="session")
def eurosat(data_dir):
    """The labelled EuroSAT RGB patches of the sample data (30 test-split images a class)."""
    return data_dir / "eurosat_rgb"


@pytest.fixture(scope="session")
def tiny_model():
    import torch

    from nec_models import create_model

    torch.manual_seed(0)
    model = create_model(TINY)
    # Give the bottleneck a density that is not the initial one, so tables are non-trivial.
    with torch.no_grad():
        eb = model.bottleneck
        eb.quantiles[:, 0, 1] = torch.linspace(-0.7, 0.9, eb.channels)
        for m in eb.matrices:
            m.add_(0.3 * torch.randn_like(m))
    return model


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_model) -> Path:
    from nec_export import export_model

    out = tmp_path_factory.mktemp("export") / TINY
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(tiny_model, out)
    return out


@pytest.fixture(scope="session")
def rvq_run(tmp_path_factory, data_dir) -> Path:
    """A tiny RVQ model trained for a few seconds on the real 10-band data: its run folder."""
    from nec_models.train_rvq import RVQConfig, train_rvq

    out = tmp_path_factory.mktemp("rvq-run")
    cfg = RVQConfig(
        data=tuple(str(data_dir / d) for d in ("ssl4eo_s12", "eurosat_ms", "bigearthnet")),
        out=str(out),
        model="rvq_s2_tiny",
        epochs=2,
        crops_per_epoch=32,
        crop=16,
        batch_size=8,
        init_crops=8,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_rvq(cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def rvq_export(tmp_path_factory, rvq_run) -> Path:
    """The tiny trained RVQ model exported (graphs, categorical tables, repositories)."""
    import torch

    from nec_export import export_model
    from nec_models.shipped import load_trained

    out = tmp_path_factory.mktemp("export") / "rvq_s2_tiny"
    ckpt = torch.load(rvq_run / "checkpoint.pth", map_location="cpu", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(load_trained(ckpt), out)
    return out


# The real local stack (a Kafka broker and an S3 server), shared by the workflow tests;
# each test uses its own topics and bucket.
@pytest.fixture(scope="session")
def kafka():
    from nec_dev.stack.kafka import LocalKafka, ensure_kafka

    ensure_kafka()
    with LocalKafka() as broker:
        yield broker


@pytest.fixture(scope="session")
def s3():
    from nec_dev.stack.s3 import LocalS3

    with LocalS3() as server:
        yield server


@pytest.fixture(scope="session")
def producer(kafka):
    from nec_serve.kafka_io import json_producer

    p = json_producer(kafka.bootstrap_servers)
    yield p
    p.close(timeout=5)


@pytest.fixture(scope="session")
def raw_producer(kafka):
    """Sends bytes as they are (None is a tombstone): what a platform may put on a topic."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
    yield p
    p.close(timeout=5)


# k8s/ rendering with the pinned kustomize (tests/support/k8s.py).
@pytest.fixture(scope="session")
def schemas() -> dict:
    from support.k8s import fetch

    return fetch()


@pytest.fixture(scope="session")
def k8s_tree(tmp_path_factory) -> Path:
    from support.k8s import copy_k8s

    return copy_k8s(tmp_path_factory.mktemp("k8s"))


@pytest.fixture(scope="session")
def rendered(schemas, k8s_tree) -> dict[str, list[dict]]:
    from support.k8s import VARIANTS, kustomize_build

    return {v: kustomize_build(schemas, k8s_tree / "overlays" / v) for v in VARIANTS}


@pytest.fixture(scope="session")
def kube():
    """A real Kubernetes API server: a local etcd + kube-apiserver + kube-controller-manager
    (built once by scripts/fetch_k8s.sh), or the cluster of NEC_TEST_KUBECONFIG."""
    from nec_dev.stack.kube import connect

    with connect() as api:
        yield api
