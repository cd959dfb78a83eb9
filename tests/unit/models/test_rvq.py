"""The RVQ Sentinel-2 compressor: model, categorical coding, trainer, export, pipeline."""

from __future__ import annotations

import csv
import io
import json
import warnings

import numpy as np
import pytest
import rasterio
import torch
from support import SSL4EO, SSL4EO_BANDS

from nec_models import create_model
from nec_models.rvq import S2_BANDS, ResidualVQ
from nec_serve.bundle import ModelBundle
from nec_serve.categorical import UNUSED_LEVEL, CategoricalCodec, categorical_tables
from nec_serve.container import ContainerReader
from nec_serve.contract import GraphRole
from nec_serve.engines import LocalEngine
from nec_serve.errors import CorruptBitstream, InvalidInput
from nec_serve.families.rvq import RVQ
from nec_serve.imagery import iter_inputs, read_raster
from nec_serve.pipeline import compress, decompress, write_bands
from nec_serve.reports import Rate

# ------------------------------------------------------------------------------ the model


def test_levels_beyond_n_add_nothing_and_decode_the_partial_sum():
    torch.manual_seed(0)
    model = create_model("rvq_s2_tiny")
    x = torch.randn(3, 10, 16, 16)
    idx, latent = model.indices(x)
    assert idx.shape == (3, 8, 64) and idx.dtype == torch.int32 and latent.shape == (3, 16, 64)
    part = idx.clone()
    part[:, 2:] = UNUSED_LEVEL
    books = model.quantizer.codebooks
    z = books[0][idx[:, 0].long()] + books[1][idx[:, 1].long()]  # (B, T, D)
    expected = model.decode(z.permute(0, 2, 1).reshape(3, 16, 8, 8))
    torch.testing.assert_close(model.decode_indices(part), expected)


def test_each_sample_uses_its_own_number_of_levels():
    torch.manual_seed(0)
    model = create_model("rvq_s2_tiny").eval()
    vectors = torch.randn(2, 16)
    full, quant, idx, _ = model.quantizer(vectors, torch.tensor([1, 8]))
    books = model.quantizer.codebooks
    torch.testing.assert_close(quant[0], books[0][idx[0, 0]])
    sum_8 = sum(books[level][idx[1, level]] for level in range(8))
    torch.testing.assert_close(quant[1], sum_8)
    torch.testing.assert_close(
        full, torch.stack([sum(books[lv][idx[i, lv]] for lv in range(8)) for i in range(2)])
    )


def test_only_the_full_code_trains_the_encoder():
    torch.manual_seed(0)
    model = create_model("rvq_s2_tiny").train()
    x = torch.randn(2, 10, 16, 16)
    full, part, _ = model(x, torch.tensor([1, 3]))
    part.pow(2).mean().backward()
    assert model.enc_in.weight.grad is None or not model.enc_in.weight.grad.any()
    assert model.dec_out.weight.grad.abs().sum() > 0  # the decoder learns the coarse rates
    full.pow(2).mean().backward()
    assert model.enc_in.weight.grad.abs().sum() > 0
    assert model(x, torch.tensor([8, 8]))[1] is None  # one pass when all used


def test_bad_band_count_or_size_is_refused():
    model = create_model("rvq_s2_tiny")
    with pytest.raises(InvalidInput, match="10, H, W"):
        model.indices(torch.zeros(1, 3, 16, 16))
    with pytest.raises(InvalidInput, match="not divisible by the downscaling factor 2"):
        model.indices(torch.zeros(1, 10, 15, 16))
    with pytest.raises(InvalidInput, match="not divisible by the downscaling factor 2"):
        create_model("rvq_s2_tiny", img_size=17)


def test_kmeans_start_and_dead_codes_are_restarted():
    torch.manual_seed(0)
    vq = ResidualVQ(levels=2, size=8, dim=4)
    data = torch.randn(400, 4)
    vq.kmeans_init(data)
    idx, _ = vq.nearest(data, 0)
    assert len(torch.unique(idx)) == 8  # k-means spreads the entries over the data
    vq.train()
    # Batches far from every entry choose one entry only; the others, idle for
    # ``dead_after`` steps, are restarted on vectors of the batch.
    far = torch.full((64, 4), 50.0) + 0.01 * torch.randn(64, 4)
    for _ in range(vq.dead_after - 1):
        vq(far, torch.full((64,), 1))
    near = lambda: int((vq.codebooks[0] - 50).abs().max(1).values.lt(5).sum())  # noqa: E731
    assert near() <= 1  # only the chosen entry drifts there (EMA), the others wait
    vq(far, torch.full((64,), 1))
    assert near() >= 7
    assert (vq.idle_steps < vq.dead_after).all()


# ------------------------------------------------------------------------------ the coder


def test_categorical_tables_smooth_and_follow_the_histogram():
    counts = np.array([[1000, 10, 0, 0], [0, 0, 0, 0]])
    tables = categorical_tables(counts)
    freq = np.diff(tables.quantized_cdf, axis=1)
    assert (freq >= 1).all() and (tables.quantized_cdf[:, -1] == 1 << 16).all()
    assert freq[0, 0] > 50 * freq[0, 1] > 50 * freq[0, 2]  # +1 smoothing keeps 2, 3 codable
    assert len(set(freq[1, :4].tolist())) <= 2  # an empty histogram is (nearly) uniform
    assert freq[:, 4].tolist() == [1, 1]  # the escape symbol
    with pytest.raises(InvalidInput, match="finite and >= 0"):
        categorical_tables(np.array([[1.0, -1.0]]))


def test_categorical_codec_round_trips_every_rate_near_the_bound():
    rng = np.random.default_rng(0)
    k, levels, t = 256, 8, 1024
    p = rng.dirichlet(np.full(k, 0.3), size=levels)
    counts = np.stack([rng.multinomial(200_000, p[level]) for level in range(levels)])
    codec = CategoricalCodec(categorical_tables(counts))
    indices = np.stack(
        [[rng.choice(k, size=t, p=p[level]) for level in range(levels)] for _ in range(3)]
    ).astype(np.int32)
    for n in (1, 4, 8):
        streams = codec.encode_batch(indices, n)
        back = codec.decode_batch(streams, t, n)
        np.testing.assert_array_equal(back[:, :n], indices[:, :n])
        assert (back[:, n:] == UNUSED_LEVEL).all()
        bits = 8 * sum(map(len, streams))
        bound = codec.entropy_bound_bits(indices, n)
        assert bound <= bits <= bound * 1.005 + 3 * 64  # 64-bit final state per stream


def test_codebook_counts_and_indices_outside_the_codebook_are_refused():
    codec = CategoricalCodec(categorical_tables(np.ones((8, 16))))
    good = np.zeros((1, 8, 4), dtype=np.int32)
    for n in (0, 9):
        with pytest.raises(InvalidInput, match=r"codebooks must be in 1..8"):
            codec.encode_batch(good, n)
    bad = good.copy()
    bad[0, 2, 3] = 16
    with pytest.raises(InvalidInput, match="index 16 at tile 0, codebook 3, position 3"):
        codec.encode_batch(bad, 8)
    codec.encode_batch(bad, 2)  # level 3 is not coded at 2 codebooks
    stream = codec.encode_batch(good, 8)[0]
    with pytest.raises(CorruptBitstream):
        codec.decode_batch([stream[:-4]], 4, 8)


@pytest.mark.parametrize("levels", [3, 8])
def test_categorical_batches_code_as_tile_by_tile(levels):
    rng = np.random.default_rng(levels)
    codec = CategoricalCodec(categorical_tables(rng.integers(0, 50, (8, 16))))
    indices = rng.integers(0, 16, (5, 8, 7)).astype(np.int32)
    idx = np.repeat(np.arange(levels, dtype=np.int32), 7)
    single = [codec._native.encode(np.ascontiguousarray(t[:levels]), idx) for t in indices]
    streams, bits, sq_err = codec.code_batch(indices, None, levels)
    assert streams == single == codec.encode_batch(indices, levels) and sq_err == 0.0
    assert bits == pytest.approx(codec.entropy_bound_bits(indices, levels), rel=1e-12)
    out = np.zeros((6, 8, 7), np.int32)
    back = codec.decode_batch(streams, 7, levels, out=out[1:])
    np.testing.assert_array_equal(back[:, :levels], indices[:, :levels])
    assert (back[:, levels:] == UNUSED_LEVEL).all() and (out[0] == 0).all()


def test_categorical_batch_decode_names_the_first_bad_stream():
    codec = CategoricalCodec(categorical_tables(np.ones((2, 16))))
    good_tile = np.zeros((2, 4), np.int32)
    good = codec._native.encode(good_tile.ravel(), np.repeat(np.arange(2, dtype=np.int32), 4))
    beyond = good_tile.copy()
    beyond[1, 2] = 20  # escape-coded: a stream that decodes to an index outside the codebook
    outside = codec._native.encode(beyond.ravel(), np.repeat(np.arange(2, dtype=np.int32), 4))
    cases = [
        ([good, outside, good[:-4]], CorruptBitstream, "stream 1: decodes to an index outside"),
        ([outside, good[:-4]], CorruptBitstream, "stream 0: decodes to an index outside"),
        ([good, good[:-4], outside], CorruptBitstream, "stream 1: truncated"),
        ([good, good, good, "x"], InvalidInput, "stream 3: bitstream must be"),
        ([good, good, outside], CorruptBitstream, "stream 2: decodes to an index outside"),
    ]
    for streams, error, message in cases:
        with pytest.raises(error, match=message):
            codec.decode_batch(streams, 4, 2)


# ------------------------------------------------------------------------------ the trainer


def test_trainer_writes_split_log_and_histograms(rvq_run):
    rows = list(csv.DictReader((rvq_run / "log.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert {f"val_rmse_pct_n{n}" for n in range(1, 9)} <= set(rows[0])
    assert all(float(rows[-1][f"perplexity_l{n}"]) >= 1 for n in range(1, 9))
    split = list(csv.DictReader((rvq_run / "split.csv").open()))
    groups: dict[tuple[str, str], set[str]] = {}
    for row in split:
        groups.setdefault((row["dataset"], row["group"]), set()).add(row["part"])
    assert all(len(parts) == 1 for parts in groups.values())  # no group in two parts
    parts = {d: {r["part"] for r in split if r["dataset"] == d} for d, _ in groups}
    # The sample data: 24 EuroSAT MS patches (a test and a val part), one SSL4EO location and
    # one BigEarthNet patch (a dataset of one group cannot be tested apart: all train).
    assert parts == {
        "eurosat_ms": {"train", "val", "test"},
        "ssl4eo_s12": {"train"},
        "bigearthnet": {"train"},
    }
    ckpt = torch.load(rvq_run / "checkpoint.pth", map_location="cpu", weights_only=True)
    counts = ckpt["model"]["quantizer.index_counts"]
    assert counts.shape == (8, 16) and (counts.sum(1) == counts.sum(1)[0]).all()
    assert counts.sum() > 0 and ckpt["args"]["model"] == "rvq_s2_tiny"


def test_trainer_resumes_to_the_same_weights(tmp_path, data_dir, monkeypatch):
    import nec_models.train_rvq as trainer

    def run(out, resume=False, **change):
        cfg = trainer.RVQConfig(
            data=(str(data_dir / "bigearthnet"),),
            out=str(out),
            model="rvq_s2_tiny",
            epochs=2,
            crops_per_epoch=16,
            crop=16,
            batch_size=8,
            init_crops=4,
            **change,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return trainer.train_rvq(cfg, resume=resume, progress=False)

    run(tmp_path / "a")
    # Interrupt the second epoch before its checkpoint, then resume.
    real, calls = trainer.rvq_metrics, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "rvq_metrics", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.setattr(trainer, "rvq_metrics", real)
    assert run(tmp_path / "b", resume=True)["epochs_run"] == 1
    a = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit
    with pytest.raises(InvalidInput, match="was run with train_codebooks = 0, not 8"):
        run(tmp_path / "b", resume=True, train_codebooks=8)


# ------------------------------------------------------------------------------ export, coding


@pytest.fixture(scope="module")
def rvq(rvq_export):
    bundle = ModelBundle.load(rvq_export)
    return bundle, LocalEngine(bundle)


def _compress(bundle, engine, path, bands=SSL4EO_BANDS, codebooks=None) -> bytes:
    buf = io.BytesIO()
    compress(iter_inputs(path, bands), bundle, engine, buf, rate=codebooks)
    return buf.getvalue()


def test_export_manifest_and_parity(rvq_export):
    bundle = ModelBundle.load(rvq_export)
    m = bundle.manifest
    assert m.family == RVQ.name and m.entropy.kind == "categorical"
    p = m.family_params
    assert (p.levels, p.codebook_size, p.downscale, p.tokens) == (8, 16, 2, 64)
    assert p.band_names == S2_BANDS and p.reflectance_scale == 10000.0
    assert set(m.graphs) == {GraphRole.ENCODER, GraphRole.RECONSTRUCTION}
    enc = m.graph(GraphRole.ENCODER)
    assert [t.name for t in enc.outputs] == ["indices", "latent"]
    assert enc.parity["symbol_mismatches"] == enc.parity["mismatches_near_half"]
    assert m.graph(GraphRole.RECONSTRUCTION).parity["max_abs_err"] < 1e-4
    # The band statistics of the training set travel in the manifest.
    assert all(0 < v < 1 for v in m.input.mean) and all(s > 0 for s in m.input.std)
    for repo in ("gpu", "cpu", "local"):
        assert (rvq_export / f"model_repository_{repo}" / "rvq_decoder" / "config.pbtxt").exists()


def test_rate_grows_with_codebooks_and_output_keeps_georeferencing(rvq, data_dir, tmp_path):
    bundle, engine = rvq
    src = data_dir / SSL4EO
    sizes = {}
    for n in (1, 3, 8):
        data = _compress(bundle, engine, src, codebooks=n)
        sizes[n] = len(data)
        header = ContainerReader(io.BytesIO(data)).header
        assert header.meta["family"] == "rvq" and header.meta["codebooks"] == n
        container = tmp_path / f"c{n}.necb"
        container.write_bytes(data)
        done = write_bands(container, tmp_path / f"out{n}.tif", bundle, engine)
        assert (done.images, done.format, done.rate) == (1, "tif", Rate("codebooks", n))
    assert sizes[1] < sizes[3] < sizes[8]
    raw = read_raster(src, SSL4EO_BANDS)
    with rasterio.open(src) as ref, rasterio.open(tmp_path / "out8.tif") as out:
        assert out.crs == ref.crs and out.transform == ref.transform
        assert out.descriptions == S2_BANDS and out.dtypes[0] == "uint16"
        assert (out.count, out.height, out.width) == (10, *raw.shape[1:])
        assert out.tags()["codebooks"] == "8"
        rec = out.read().astype(np.float64)
    # A few seconds of training: far from good, but the scale is that of the input.
    assert abs(rec.mean() - raw.mean()) < 0.5 * raw.mean()


def test_several_images_decode_to_a_tar_of_geotiffs(rvq, data_dir, tmp_path):
    import tarfile

    bundle, engine = rvq
    folder = data_dir / "eurosat_ms" / "SeaLake"
    data = _compress(bundle, engine, folder, bands=[2, 3, 4, 5, 6, 7, 8, 9, 12, 13], codebooks=2)
    (tmp_path / "c.necb").write_bytes(data)
    done = write_bands(tmp_path / "c.necb", tmp_path / "sea.tif", bundle, engine)
    assert done.format == "tar" and done.path == str(tmp_path / "sea.tar")
    with tarfile.open(done.path) as tar:
        names = tar.getnames()
    assert len(names) == done.images == len(list(folder.glob("*.tif")))
    assert all(n.endswith(".tif") for n in names)
    assert not (tmp_path / "sea.tif").exists()


def test_bad_rvq_inputs_are_refused(rvq, data_dir, tmp_path, tiny_export):
    bundle, engine = rvq
    src = data_dir / SSL4EO
    with pytest.raises(InvalidInput, match="has 3 bands"):
        _compress(bundle, engine, src, bands=[2, 3, 4])
    for n in (0, 9):
        with pytest.raises(InvalidInput, match=r"codebooks must be in 1..8"):
            _compress(bundle, engine, src, codebooks=n)
    neg = read_raster(src, SSL4EO_BANDS).astype(np.float32)
    neg[4, 10, 20] = -3.0
    np.save(tmp_path / "neg.npy", neg)
    with pytest.raises(InvalidInput, match=r"negative reflectance .* \(4, 10, 20\)"):
        _compress(bundle, engine, tmp_path / "neg.npy", bands=None)
    neg[4, 10, 20] = np.nan
    np.save(tmp_path / "nan.npy", neg)
    with pytest.raises(InvalidInput, match="non-finite"):
        _compress(bundle, engine, tmp_path / "nan.npy", bands=None)
    # A container of one family given to the other's decoder, both ways.
    nec = ModelBundle.load(tiny_export)
    naip = data_dir / "naip" / "m_4709963_se_14_1_20180716.tif"
    nec_data = io.BytesIO()
    compress(iter_inputs(naip, [1, 2, 3]), nec, LocalEngine(nec), nec_data)
    with pytest.raises(InvalidInput, match="'nec'-family code"):
        decompress(io.BytesIO(nec_data.getvalue()), bundle, engine, "bands")
    rvq_data = _compress(bundle, engine, src, codebooks=2)
    with pytest.raises(InvalidInput, match="'rvq'-family code"):
        decompress(io.BytesIO(rvq_data), nec, LocalEngine(nec), "embeddings")
    with pytest.raises(InvalidInput, match="applies to the RVQ family"):
        compress(iter_inputs(naip, [1, 2, 3]), nec, LocalEngine(nec), io.BytesIO(), rate=2)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_containers_fail_and_leave_nothing(rvq, data_dir, tmp_path, damage):
    bundle, engine = rvq
    data = bytearray(_compress(bundle, engine, data_dir / SSL4EO, codebooks=4))
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x10
    (tmp_path / "bad.necb").write_bytes(bytes(data))
    with pytest.raises(CorruptBitstream):
        write_bands(tmp_path / "bad.necb", tmp_path / "bad.tif", bundle, engine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.necb"]


def test_cli_export_compress_inspect_decompress(rvq_run, data_dir, tmp_path, capsys):
    from nec_cli.main import main

    export = tmp_path / "export"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (
            main(["export", "--checkpoint", str(rvq_run / "checkpoint.pth"), "--out", str(export)])
            == 0
        )
    assert "rvq_s2_tiny" in capsys.readouterr().out
    src = data_dir / "eurosat_ms" / "Forest"
    first = sorted(src.glob("*.tif"))[0]
    bands = "2,3,4,5,6,7,8,9,12,13"
    args = ["--model-dir", str(export), "-q"]
    assert (
        main(
            [
                "compress",
                str(first),
                "--out",
                str(tmp_path / "f.necb"),
                "--bands",
                bands,
                "--codebooks",
                "3",
                *args,
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert (report["family"], report["codebooks"], report["tiles"]) == ("rvq", 3, 16)
    assert main(["inspect", str(tmp_path / "f.necb")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "rvq" and info["codebooks"] == 3 and info["tiles"] == 16
    assert (
        main(["decompress", str(tmp_path / "f.necb"), "--out", str(tmp_path / "f.tif"), *args]) == 0
    )
    assert "at codebooks=3" in capsys.readouterr().out
    with rasterio.open(tmp_path / "f.tif") as out, rasterio.open(first) as ref:
        assert out.crs == ref.crs and out.transform == ref.transform and out.shape == (64, 64)
    assert (
        main(
            [
                "compress",
                str(first),
                "--out",
                str(tmp_path / "g.necb"),
                "--bands",
                bands,
                "--codebooks",
                "9",
                *args,
            ]
        )
        == 2
    )
    assert "codebooks must be in 1..8" in capsys.readouterr().err
    assert not (tmp_path / "g.necb").exists()


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("family_params", "tokens"), 65, r"tokens 65 is not \(input.img_size / downscale\)\^2"),
        (("family_params", "band_names"), ["B02"], "band_names has 1 names for 10 input bands"),
        (("family_params", "downscale"), 3, "downscale must be 1, 2 or 4"),
        (("entropy", "kind"), "factorized", "is not an entropy model of family 'rvq'"),
        (("family_params", "output_dtype"), "float32", "output_dtype 'float32' is not uint16"),
    ],
)
def test_rvq_manifest_fields_are_checked(rvq_export, path, value, match):
    from nec_serve.contract import Manifest
    from nec_serve.errors import ManifestError

    data = json.loads((rvq_export / "manifest.json").read_text())
    data[path[0]][path[1]] = value
    with pytest.raises(ManifestError, match=match):
        Manifest.from_dict(data)


def test_eo4eu_tensor_names_serve_the_same_codes(rvq_run, rvq, data_dir, tmp_path, tiny_model):
    from nec_export import ExportOptions, export_model
    from nec_models.shipped import load_trained

    ckpt = torch.load(rvq_run / "checkpoint.pth", map_location="cpu", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(load_trained(ckpt), tmp_path / "eo4eu", ExportOptions(eo4eu_names=True))
    named = ModelBundle.load(tmp_path / "eo4eu")
    enc = named.manifest.graph(GraphRole.ENCODER)
    dec = named.manifest.graph(GraphRole.RECONSTRUCTION)
    assert enc.inputs[0].name == "input_sentinel2_10_bands_16"
    assert enc.outputs[0].name == dec.inputs[0].name == "int64_latent32_15"
    assert dec.outputs[0].name == "output_sentinel2_10_bands_16"
    bundle, engine = rvq
    src = data_dir / SSL4EO
    assert _compress(named, LocalEngine(named), src, codebooks=3) == _compress(
        bundle, engine, src, codebooks=3
    )
    with pytest.raises(InvalidInput, match="applies to the RVQ family"):
        export_model(tiny_model, tmp_path / "nec", ExportOptions(eo4eu_names=True))


@pytest.mark.slow
def test_bench_rvq_scores_every_codec_from_real_files(rvq_run, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_rvq.py"
    spec = importlib.util.spec_from_file_location("bench_rvq", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ckpt, out = str(rvq_run / "checkpoint.pth"), tmp_path / "rvq"
    args = ["--checkpoint", ckpt, "--compare", ckpt, "--out", str(out), "--quick"]
    assert bench.main([*args, "--max-images", "6"]) == 0
    rows = list(csv.DictReader((out / "rvq.csv").open()))
    rvq = [r for r in rows if r["method"] == "rvq"]
    assert [int(r["setting"]) for r in rvq] == list(range(1, 9))
    bpp = [float(r["bpp"]) for r in rvq]
    assert bpp == sorted(bpp) and all(float(r["payload_bpp"]) < float(r["bpp"]) for r in rvq)
    assert {r["method"] for r in rows} == {"rvq", "rvq_fixed8", "jpeg2000", "jpeg", "zstd"}
    j2k = sorted((float(r["bpp"]), float(r["rmse_pct"])) for r in rows if r["method"] == "jpeg2000")
    assert [e for _, e in j2k] == sorted((e for _, e in j2k), reverse=True)  # more bits, less error
    zstd = next(r for r in rows if r["method"] == "zstd")
    assert float(zstd["rmse_pct"]) == 0 and float(zstd["bpp"]) > 40  # lossless 10 x 16 bit
    assert all(float(r[f"rmse_pct_{b}"]) >= 0 for r in rows for b in S2_BANDS)
    assert (out / "rvq.png").stat().st_size > 10_000
    text = (out / "rvq.md").read_text()
    assert "Below 2 % RMS:" in text and "entropy bound" in text and "conditioned" in text
    assert "perplexity" in text
