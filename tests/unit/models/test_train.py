"""MAE pretraining on real EuroSAT patches, a few seconds of it: the loss goes down, a
checkpoint is in the official layout and loads, an interrupted run resumes to the same
weights, a diverging run stops and keeps its last good checkpoint, bad input is refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from unittest.mock import patch

import pytest
import torch

from nec_models import create_model, load_checkpoint
from nec_models.train import MAEConfig, TrainingDiverged, _Batches, train_mae
from nec_serve.errors import InvalidInput


def _config(eurosat, out, **kw) -> MAEConfig:
    base = dict(
        data=str(eurosat),
        out=str(out),
        model="mae_vit_pretrain_test",
        epochs=4,
        batch_size=8,
        blr=1e-2,
        warmup_epochs=1,
        max_items=10,  # 10 real patches a class: 80 train, 10 val, 10 test
        threads=1,
    )
    return MAEConfig(**{**base, **kw})


def test_the_loss_goes_down_and_the_checkpoint_is_official(eurosat, tmp_path):
    cfg = _config(eurosat, tmp_path / "run", epochs=6)
    result = train_mae(cfg, progress=False)
    assert result["split"] == {"train": 80, "val": 10, "test": 10} and result["skipped"] == 0
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert rows[0] == "epoch,train_loss,val_loss,lr,seconds,images_per_s" and len(rows) == 7
    train = [float(r.split(",")[1]) for r in rows[1:]]
    val = [float(r.split(",")[2]) for r in rows[1:]]
    assert train[-1] < 0.8 * train[0] and val[-1] < val[0], (train, val)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    official = {"model", "optimizer", "epoch", "scaler", "args"}  # plus the loop's own
    assert set(ckpt) == official | {"lr", "rng", "metrics", "best"} and ckpt["epoch"] == 5
    assert ckpt["metrics"]["epoch"] == 5 and ckpt["best"]["val_loss"] <= ckpt["metrics"]["val_loss"]
    model = load_checkpoint(create_model(cfg.model), tmp_path / "run" / "checkpoint.pth")
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"][key]), key


def test_an_interrupted_run_resumes_to_the_same_weights(eurosat, tmp_path):
    straight = _config(eurosat, tmp_path / "straight")
    train_mae(straight, progress=False)
    broken = _config(eurosat, tmp_path / "broken")
    real, calls = _Batches.__call__, []

    def killed(self, images, gen):  # the process dies in the middle of epoch 2
        calls.append(1)
        if len(calls) == 2 * 12 + 3:  # 10 train + 2 validation batches an epoch
            raise KeyboardInterrupt
        return real(self, images, gen)

    with patch.object(_Batches, "__call__", killed), pytest.raises(KeyboardInterrupt):
        train_mae(broken, progress=False)
    assert torch.load(tmp_path / "broken" / "checkpoint.pth", weights_only=True)["epoch"] == 1
    result = train_mae(broken, resume=True, progress=False)
    assert result["epochs_run"] == 2 and result["last_epoch"] == 3
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "broken" / "checkpoint.pth", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    log = (tmp_path / "broken" / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in log[1:]] == ["0", "1", "2", "3"]
    assert train_mae(broken, resume=True, progress=False)["epochs_run"] == 0  # already done


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(eurosat, tmp_path):
    cfg = _config(eurosat, tmp_path / "run")
    real = type(create_model(cfg.model)).masked_loss
    calls = []

    def explode(self, *args, **kw):
        calls.append(1)
        loss = real(self, *args, **kw)
        return loss * float("nan") if len(calls) > 12 else loss

    with patch.object(type(create_model(cfg.model)), "masked_loss", explode):
        with pytest.raises(TrainingDiverged, match="loss is nan at epoch 1.*epoch 0 is kept"):
            train_mae(cfg, progress=False)
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["epoch"] == 0


def test_bad_runs_are_refused(eurosat, tmp_path):
    with pytest.raises(InvalidInput, match="no checkpoint"):
        train_mae(_config(eurosat, tmp_path / "none"), resume=True, progress=False)
    train_mae(_config(eurosat, tmp_path / "run", epochs=1), progress=False)
    with pytest.raises(InvalidInput, match="exists: pass --resume"):
        train_mae(_config(eurosat, tmp_path / "run", epochs=1), progress=False)
    other = _config(eurosat, tmp_path / "run", model="mae_vit_tiny_patch8")
    with pytest.raises(InvalidInput, match="is a 'mae_vit_pretrain_test' run"):
        train_mae(other, resume=True, progress=False)
    # Every setting matters but where the run is, its threads and its number of epochs.
    for change in ({"batch_size": 4}, {"blr": 0.02}):
        other = _config(eurosat, tmp_path / "run", **{"epochs": 1, **change})
        field, value = next(iter(change.items()))
        with pytest.raises(InvalidInput, match=f"was run with {field} = .*, not {value}"):
            train_mae(other, resume=True, progress=False)
    moved = _config(eurosat, tmp_path / "run", epochs=1, threads=2)
    assert train_mae(moved, resume=True, progress=False)["epochs_run"] == 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="no images"):
        train_mae(_config(tmp_path / "empty", tmp_path / "e"), progress=False)
    with pytest.raises(InvalidInput, match="the val split .* is empty"):
        train_mae(_config(eurosat, tmp_path / "few", max_items=3), progress=False)
    with pytest.raises(InvalidInput, match="mask_ratio"):
        _config(eurosat, tmp_path / "x", mask_ratio=1.0)


# ------------------------------------------------------------------------ NEC fine-tuning


@pytest.fixture(scope="module")
def mae_run(eurosat, tmp_path_factory):
    out = tmp_path_factory.mktemp("mae")
    train_mae(_config(eurosat, out, epochs=2), progress=False)
    return out / "checkpoint.pth"


@pytest.mark.parametrize("rate_on", ["visible", "all"])
def test_nec_fine_tuning_trains_the_adapter_only_and_measures_its_rate(mae_run, tmp_path, rate_on):
    from nec_models.train import NEC_LOG_FIELDS, NECConfig, train_nec

    cfg = NECConfig(
        init=str(mae_run),
        out=str(tmp_path / "nec"),
        lmbda=100,
        rate_on=rate_on,
        epochs=3,
        batch_size=8,
        lr=1e-3,
        threads=1,
    )
    result = train_nec(cfg, progress=False)
    assert result["epochs_run"] == 3
    rows = (tmp_path / "nec" / "log.csv").read_text().splitlines()
    assert rows[0] == ",".join(NEC_LOG_FIELDS) and len(rows) == 4
    bits = [float(r.split(",")[3]) for r in rows[1:]]
    assert bits[-1] < bits[0]  # the rate term is being minimised
    # The estimate on every token is the size really coded, to a few percent; the official
    # estimate on the visible tokens only sees about a quarter of it (mask ratio 0.75).
    est, coded = result["val_bits_estimate"], result["val_bits_coded"]
    assert abs(est - coded) / coded < 0.05, (est, coded)
    if rate_on == "visible":
        assert result["train_bits"] < 0.4 * coded
    else:  # an epoch's mean, while the rate still falls: above the end-of-epoch size
        assert 0 <= (result["train_bits"] - coded) / coded < 0.3
    # Only the adapter moved; the checkpoint loads through the official-layout loader.
    mae = torch.load(mae_run, weights_only=True)["model"]
    nec = load_checkpoint(
        create_model("nec_vit_pretrain_test"), tmp_path / "nec" / "checkpoint.pth"
    )
    state = nec.state_dict()
    last = len(nec.blocks) - 1
    assert not torch.equal(
        state[f"blocks.{last}.attn.qkv.weight"], mae[f"blocks.{last}.attn.qkv.weight"]
    )
    assert not torch.equal(
        state["decoder_blocks.0.mlp.fc1.weight"], mae["decoder_blocks.0.mlp.fc1.weight"]
    )
    for key in ("blocks.0.attn.qkv.weight", "blocks.0.norm1.weight"):
        assert torch.equal(state[key], mae[key]), key
    assert (tmp_path / "nec" / "split.csv").read_bytes() == (
        mae_run.parent / "split.csv"
    ).read_bytes()


def test_nec_fine_tuning_refuses_a_bad_init(mae_run, tmp_path):
    from nec_models.train import NECConfig, train_nec

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidInput, match="not an MAE pretraining checkpoint"):
        train_nec(NECConfig(init=str(bad), out=str(tmp_path / "o")), progress=False)
    state = torch.load(mae_run, weights_only=True)
    state["model"]["patch_embed.proj.weight"] = torch.zeros(5, 3, 8, 8)  # another width
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(InvalidInput, match="does not fit 'nec_vit_pretrain_test'"):
        train_nec(NECConfig(init=str(tmp_path / "other.pth"), out=str(tmp_path / "o2")))
    with pytest.raises(InvalidInput, match="rate-on must be visible or all"):
        NECConfig(init=str(mae_run), out=str(tmp_path / "o"), rate_on="some")


def test_nec_fine_tuning_resumes_to_the_same_weights(mae_run, tmp_path):
    from nec_models.train import NECConfig, train_nec

    def cfg(out, epochs):
        return NECConfig(
            init=str(mae_run), out=str(out), lmbda=100, epochs=epochs, batch_size=8, threads=1
        )

    train_nec(cfg(tmp_path / "straight", 3), progress=False)
    train_nec(cfg(tmp_path / "resumed", 2), progress=False)
    assert train_nec(cfg(tmp_path / "resumed", 3), resume=True, progress=False)["epochs_run"] == 1
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------ classifier head


@pytest.fixture(scope="module")
def nec_run(mae_run, tmp_path_factory):
    from nec_models.train import NECConfig, train_nec

    out = tmp_path_factory.mktemp("nec")
    train_nec(
        NECConfig(init=str(mae_run), out=str(out), lmbda=100, epochs=2, batch_size=8, threads=1),
        progress=False,
    )
    return out / "checkpoint.pth"


@pytest.mark.parametrize("with_decoder", [False, True])
def test_the_classifier_trains_on_decoded_embeddings_with_the_code_frozen(
    nec_run, tmp_path, with_decoder
):
    from nec_models.train import ClassifierConfig, train_classifier

    cfg = ClassifierConfig(
        init=str(nec_run),
        out=str(tmp_path / "cls"),
        with_decoder=with_decoder,
        epochs=8,
        batch_size=16,
        lr=3e-3,
        threads=1,
    )
    result = train_classifier(cfg, progress=False)
    assert "test_top1" not in result  # the test split stays untouched unless asked
    rows = (tmp_path / "cls" / "log.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[1]) for r in rows]
    assert len(rows) == 8 and losses[-1] < losses[0], losses
    assert 0.0 <= result["val_top1"] <= 1.0 and result["train_top1"] > 0.2
    name = "nec_classifier_pretrain_test"
    cls = load_checkpoint(
        create_model(name, with_decoder=with_decoder), tmp_path / "cls" / "checkpoint.pth"
    )
    nec = torch.load(nec_run, weights_only=True)["model"]
    backbone = cls.backbone.state_dict()
    for key in ("norm.weight", "norm.bias", "blocks.1.attn.qkv.weight", "bottleneck.quantiles"):
        assert torch.equal(backbone[key], nec[key]), key  # the transmitted code is unchanged
    if with_decoder:
        assert not torch.equal(
            backbone["decoder_blocks.0.mlp.fc1.weight"], nec["decoder_blocks.0.mlp.fc1.weight"]
        )
    # The cached embeddings are what a consumer decodes: the head on them equals the model
    # run end to end on the images.
    x = torch.randn(3, 3, 64, 64)
    b = cls.backbone
    with torch.no_grad():
        emb = b.dequantize(b.symbols(b.latent(x)))
        assert torch.equal(cls.forward_embeddings(emb), cls(x))
    final = train_classifier(
        ClassifierConfig(
            init=str(nec_run),
            out=str(tmp_path / "final"),
            epochs=1,
            threads=1,
            evaluate_test=True,
        ),
        progress=False,
    )
    assert 0.0 <= final["test_top1"] <= 1.0


def test_the_classifier_resumes_to_the_same_weights(nec_run, tmp_path):
    from nec_models.train import ClassifierConfig, train_classifier

    def cfg(out, epochs):
        return ClassifierConfig(
            init=str(nec_run), out=str(out), epochs=epochs, batch_size=16, lr=3e-3, threads=1
        )

    train_classifier(cfg(tmp_path / "straight", 2), progress=False)
    train_classifier(cfg(tmp_path / "resumed", 1), progress=False)
    with pytest.raises(InvalidInput, match="exists: pass --resume"):
        train_classifier(cfg(tmp_path / "resumed", 2), progress=False)
    result = train_classifier(cfg(tmp_path / "resumed", 2), resume=True, progress=False)
    assert (result["epochs_run"], result["last_epoch"]) == (1, 1)
    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert {**a["args"], "out": ""} == {**b["args"], "out": ""}
    assert a["best"]["epoch"] == b["best"]["epoch"]
    logs = [(tmp_path / r / "log.csv").read_text().splitlines() for r in ("straight", "resumed")]
    assert [row.rsplit(",", 1)[0] for row in logs[0]] == [row.rsplit(",", 1)[0] for row in logs[1]]
    with pytest.raises(InvalidInput, match="was run with batch_size = 16, not 256"):
        train_classifier(
            dataclasses.replace(cfg(tmp_path / "resumed", 2), batch_size=256), resume=True
        )


def test_the_classifier_refuses_what_is_not_a_nec_run(mae_run, tmp_path):
    from nec_models.train import ClassifierConfig, train_classifier

    with pytest.raises(InvalidInput, match="has no classifier"):
        train_classifier(ClassifierConfig(init=str(mae_run), out=str(tmp_path / "c")))


def test_the_cli_passes_every_flag_to_the_trainers(eurosat, tmp_path, capsys):
    from nec_cli.main import main

    mae = tmp_path / "mae"
    common = ["--batch-size", "8", "--threads", "1", "-q"]
    argv = ["train", "mae", "--data", str(eurosat), "--out", str(mae), "--model"]
    argv += ["mae_vit_pretrain_test", "--epochs", "1", "--max-items", "10", "--blr", "0.01"]
    assert main([*argv, *common]) == 0
    args = torch.load(mae / "checkpoint.pth", weights_only=True)["args"]
    assert (args["blr"], args["max_items"], args["batch_size"], args["epochs"]) == (0.01, 10, 8, 1)
    nec = tmp_path / "nec"
    argv = ["train", "nec", "--init", str(mae / "checkpoint.pth"), "--out", str(nec)]
    assert main([*argv, "--rate-on", "all", "--lmbda", "50", "--epochs", "1", *common]) == 0
    args = torch.load(nec / "checkpoint.pth", weights_only=True)["args"]
    assert (args["rate_on"], args["lmbda"], args["model"]) == ("all", 50.0, "nec_vit_pretrain_test")
    argv = ["train", "classifier", "--init", str(nec / "checkpoint.pth"), "--out"]
    assert main([*argv, str(tmp_path / "cls"), "--epochs", "1", "--with-decoder", *common]) == 0
    assert '"val_top1"' in capsys.readouterr().out
    assert main(["train", "nec", "--init", str(tmp_path / "none.pth"), "--out", "x", "-q"]) == 2


# ------------------------------------------------------------------------ labels as a step output


@pytest.mark.slow
def test_a_trained_classifier_exports_its_head_and_decompress_outputs_labels(
    nec_run, eurosat, tmp_path, capsys
):
    import json
    import shutil

    import numpy as np

    from nec_cli.main import main
    from nec_models.eurosat import CLASSES
    from nec_serve.bundle import ModelBundle
    from nec_serve.contract import GraphRole, Manifest
    from nec_serve.engines import make_engine
    from nec_serve.imagery import read_raster

    cls_dir, exp = tmp_path / "cls", tmp_path / "export"
    argv = ["train", "classifier", "--init", str(nec_run), "--out", str(cls_dir)]
    assert main([*argv, "--epochs", "2", "--batch-size", "16", "--threads", "1", "-q"]) == 0
    # The trainer's checkpoint names its model and classes: export needs nothing else.
    assert main(["export", "--checkpoint", str(cls_dir / "checkpoint.pth"), "--out", str(exp)]) == 0
    manifest = Manifest.load(exp)
    assert manifest.model == "nec_classifier_pretrain_test"
    assert manifest.family_params.class_names == CLASSES
    head = manifest.graph(GraphRole.CLASSIFIER)
    assert head.outputs[0].dims == (len(CLASSES),) and head.parity["max_abs_err"] <= 1e-4
    assert GraphRole.FEATURES not in manifest.graphs  # trained without the decoder block

    # One real patch of each of four classes, compressed and labelled by a consumer step.
    images = tmp_path / "patches"
    images.mkdir()
    picked = [next((eurosat / c).glob("*.jpg")) for c in CLASSES[:4]]
    for p in picked:
        shutil.copy(p, images / p.name)
    container = tmp_path / "patches.nec"
    argv = ["compress", str(images), "--out", str(container), "--model-dir", str(exp), "-q"]
    assert main(argv) == 0
    out = tmp_path / "scores.npy"
    argv = ["decompress", str(container), "--out", str(out), "--output", "classes", "-q"]
    assert main([*argv, "--model-dir", str(exp)]) == 0
    report = json.loads(out.with_suffix(".classes.json").read_text())
    scores = np.load(out)
    assert scores.shape == (4, len(CLASSES)) and np.allclose(scores.sum(1), 1, atol=1e-5)
    assert [t["source"] for t in report["tiles"]] == sorted(p.name for p in picked)
    for tile, row in zip(report["tiles"], scores, strict=True):
        assert tile["class"] == CLASSES[int(row.argmax())]
        assert tile["scores"][tile["class"]] == tile["score"] == round(float(row.max()), 6)

    # The served head scores what PyTorch scores on the same images.
    from nec_models import create_model, load_checkpoint

    model = load_checkpoint(
        create_model("nec_classifier_pretrain_test"), cls_dir / "checkpoint.pth"
    )
    bundle = ModelBundle.load(exp)
    norm = bundle.normalisation("uint8")
    batch = np.stack([read_raster(images / t["source"]) for t in report["tiles"]])
    x = norm.apply(batch)
    with torch.no_grad():
        want = torch.softmax(model(torch.from_numpy(x)), -1).numpy()
    engine = make_engine(bundle)
    symbols, _ = engine.encode(x)
    got = engine.decode(GraphRole.CLASSIFIER, symbols)
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(scores - want).max() < 1e-4

    # An export without a head cannot answer --output classes, and says so.
    plain = tmp_path / "plain"
    assert main(["export", "--checkpoint", str(nec_run), "--out", str(plain)]) == 0
    argv = ["compress", str(images), "--out", str(container), "--model-dir", str(plain), "-q"]
    assert main(argv) == 0
    capsys.readouterr()
    argv = ["decompress", str(container), "--out", str(tmp_path / "x.npy"), "-q"]
    assert main([*argv, "--output", "classes", "--model-dir", str(plain)]) == 2
    assert "needs the classifier graph" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "x.classes.json").exists()


@pytest.mark.slow
def test_bench_rate_scores_every_condition_from_real_files(mae_run, nec_run, eurosat, tmp_path):
    import csv
    import importlib.util

    from nec_cli.main import main

    spec = importlib.util.spec_from_file_location(
        "bench_rate", Path(__file__).resolve().parents[3] / "benchmarks" / "bench_rate.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cls_dir, exp = tmp_path / "cls", tmp_path / "export"
    argv = ["train", "classifier", "--init", str(nec_run), "--out", str(cls_dir), "-q"]
    assert main([*argv, "--epochs", "1", "--threads", "1"]) == 0
    assert main(["export", "--checkpoint", str(cls_dir / "checkpoint.pth"), "--out", str(exp)]) == 0
    out = tmp_path / "rate"
    args = ["--mae", str(mae_run), "--nec", str(exp), "--data", str(eurosat), "--out", str(out)]
    args += ["--work", str(tmp_path / "work"), "--train-per-class", "2", "--max-test", "10"]
    args += ["--head-model", "nec_classifier_pretrain_test", "--head-epochs", "1"]
    args += ["--cnn-epochs", "1", "--uniform-bits", "2", "8", "--quick", "--threads", "1"]
    assert bench.main(args) == 0
    rows = list(csv.DictReader((out / "rate.csv").open()))
    kinds = {(r["kind"], r["codec"]) for r in rows}
    assert {("raw", "jpeg"), ("raw", "webp"), ("raw", "jpeg2000"), ("raw", "png")} <= kinds
    assert {
        ("embedding", "float32"),
        ("embedding", "uniform+zstd"),
        ("nec", "nec_classifier_pretrain_test"),
    } <= kinds
    by = {(r["codec"], r["setting"]): r for r in rows}
    jpeg = [float(by["jpeg", f"q{q}"]["bits_per_image"]) for q in (10, 50, 90)]
    assert jpeg == sorted(jpeg) and jpeg[0] > 0  # a higher quality costs more bits
    assert float(by["uniform+zstd", "2bit"]["bits_per_image"]) < float(
        by["uniform+zstd", "8bit"]["bits_per_image"]
    )
    assert float(by["float32", "uncompressed"]["bits_per_image"]) == 32 * 65 * 64  # T x C
    nec = by["nec_classifier_pretrain_test", "export"]
    # Real container bytes: the header is amortised over 10 images, the payload alone less.
    assert 0 < float(nec["payload_bits_per_image"]) < float(nec["bits_per_image"])
    for r in rows:
        for key in ("head_top1", "cnn_top1", "shipped_top1"):
            assert r[key] == "" or 0.0 <= float(r[key]) <= 1.0
    assert (out / "rate.png").stat().st_size > 10_000
    assert "\n| export | " in (out / "rate.md").read_text()  # the NEC row, by its export
    # A rerun skips what is done.
    before = (out / "rate.csv").read_text()
    assert bench.main(args) == 0 and (out / "rate.csv").read_text() == before


@pytest.mark.slow
def test_shipped_weights_are_a_half_precision_base_and_small_deltas(
    mae_run, nec_run, eurosat, tmp_path, monkeypatch, capsys
):
    from nec_cli.main import main
    from nec_models import shipped
    from nec_serve.contract import GraphRole, Manifest

    cls_dir = tmp_path / "cls"
    argv = ["train", "classifier", "--init", str(nec_run), "--out", str(cls_dir), "-q"]
    assert main([*argv, "--epochs", "1", "--threads", "1"]) == 0
    root = tmp_path / "weights"
    index = shipped.pack(
        mae_run,
        {"tiny-L100": cls_dir / "checkpoint.pth"},
        root / "eurosat",
        {"tiny-L100": {"x": 1}},
    )
    delta = torch.load(root / "eurosat" / "tiny-L100.pt", weights_only=True)
    assert "backbone.blocks.1.attn.qkv.weight" in delta  # the adapter: the last block
    assert "backbone.blocks.0.attn.qkv.weight" not in delta  # frozen: taken from the base
    assert {"pool.q.weight", "head.weight"} <= set(delta)
    assert delta["backbone.bottleneck.quantiles"].dtype == torch.float32  # the code: exact
    assert delta["head.weight"].dtype == torch.float16
    assert index["models"]["tiny-L100"]["metrics"] == {"x": 1}

    trained = torch.load(cls_dir / "checkpoint.pth", weights_only=True)["model"]
    rebuilt = shipped.materialize("tiny-L100", root)["model"]
    assert set(rebuilt) == set(trained)
    for key, value in trained.items():
        want = value if "bottleneck" in key or not value.is_floating_point() else value.half()
        assert torch.equal(rebuilt[key], want.to(rebuilt[key].dtype)), key
    with pytest.raises(InvalidInput, match=r"no shipped model 'nope'; shipped: "):
        shipped.materialize("nope", root)
    (root / "eurosat" / "tiny-L100.pt").write_bytes(b"tampered")
    with pytest.raises(InvalidInput, match=r"tiny-L100\.pt: SHA-256 .* the index says"):
        shipped.materialize("tiny-L100", root)

    shipped.pack(mae_run, {"tiny-L100": cls_dir / "checkpoint.pth"}, root / "eurosat")
    assert (root / "eurosat" / "split.csv").read_bytes() == (
        mae_run.parent / "split.csv"
    ).read_bytes()
    assert shipped.split_of("tiny-L100", root) == root / "eurosat" / "split.csv"
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", root)
    assert main(["models"]) == 0
    assert "tiny-L100: nec_classifier_pretrain_test" in capsys.readouterr().out
    exp = tmp_path / "export"
    assert main(["export", "--shipped", "tiny-L100", "--out", str(exp)]) == 0
    manifest = Manifest.load(exp)
    assert GraphRole.CLASSIFIER in manifest.graphs
    assert manifest.checkpoint_sha256 == shipped.shipped_models()["tiny-L100"]["sha256"]

    # The demo runs it by default when it is the one named, on the Sentinel-2 data it fits.
    work = tmp_path / "demo"
    argv = ["demo", "--model", "tiny-L100", "--work", str(work), "--skip-workflow", "-q"]
    assert main([*argv, "--data", str(eurosat.parent)]) == 0
    out = capsys.readouterr().out
    rows = {r["dataset"]: r for r in json.loads((work / "summary.json").read_text())}
    assert rows["eurosat_test"]["images"] == 10 and rows["eurosat_test"]["scored"] == 10
    assert 0 <= rows["eurosat_test"]["top1"] <= 1 and "bits/image | top-1" in out
    for name in ("eurosat_ms", "bigearthnet", "ssl4eo"):
        if (
            eurosat.parent / {"eurosat_ms": "eurosat_ms", "ssl4eo": "ssl4eo_s12"}.get(name, name)
        ).exists():
            assert rows[name]["container_bytes"] > 0 and rows[name]["decoded_max_abs_err"] <= 0.5
    report = json.loads((work / "eurosat_test.classes.json").read_text())
    assert len(report["tiles"]) == 10 and report["class_names"][0] == "AnnualCrop"
