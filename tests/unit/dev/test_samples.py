"""The sample data that travels with the repository, and where the demo finds its data.

The samples hold only test-split files of the shipped models, every one recorded in
``SHA256SUMS``; the resolver takes ``--data`` > ``$NEC_DATA`` > ``../shared/data`` > the
samples and refuses a folder without the expected sub-folders and a changed sample file, by
name, with exit status 2 from the CLI. A clone of the repository with nothing beside it runs
the demo's in-process part on its own samples.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from nec_dev import data as resolver
from nec_dev.data import FOLDERS, MANIFEST, open_data, resolve_data, write_manifest
from nec_serve.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[3]
SAMPLES = ROOT / "data" / "samples"


def test_the_samples_are_small_recorded_and_from_test_splits_only():
    from nec_models.eurosat import read_split
    from nec_models.sentinel2 import read_s2_split

    source = open_data(SAMPLES, "samples")
    assert source.samples and source.folders == FOLDERS and source.files == 343
    files = [p for p in SAMPLES.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20e6
    eurosat = read_split(ROOT / "weights/eurosat/split.csv")
    test = {i.path for i in eurosat["test"]}
    rgb = {
        p.relative_to(SAMPLES / "eurosat_rgb").as_posix() for p in files if "eurosat_rgb" in p.parts
    }
    assert len(rgb) == 300 and rgb <= test
    s2 = read_s2_split(ROOT / "weights/sentinel2/split.csv")
    s2_test = {Path(i.path).name for i in s2["test"]}
    for pattern in ("eurosat_ms/*/*.tif", "ssl4eo_s12/*.tif", "bigearthnet/*"):
        names = {p.name for p in SAMPLES.glob(pattern)}
        assert names and names <= s2_test, pattern


def _folder(tmp_path: Path) -> Path:
    """A small sample folder: two real files and its SHA256SUMS."""
    root = tmp_path / "samples"
    for rel in ("naip/m_4709963_se_14_1_20180716.tif", "landsat/1985.tif"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLES / rel, root / rel)
    assert write_manifest(root) == 2
    return root


def test_the_resolution_order(tmp_path, monkeypatch):
    full, env, arg = (tmp_path / n for n in ("shared", "env", "arg"))
    for d in (full, env, arg):
        (d / "naip").mkdir(parents=True)
    monkeypatch.setattr(resolver, "shared_dir", lambda: full)
    environ = {"NEC_DATA": str(env)}
    got = resolve_data(arg, environ)
    assert (got.root, got.origin, got.samples) == (arg, "--data", False)
    assert (resolve_data(None, environ).root, resolve_data(None, environ).origin) == (
        env,
        "$NEC_DATA",
    )
    got = resolve_data(None, {"NEC_DATA": ""})
    assert (got.root, got.origin, got.folders) == (full, "../shared/data", ("naip",))
    assert "full data" in got.describe()
    monkeypatch.setattr(resolver, "shared_dir", lambda: tmp_path / "absent")
    got = resolve_data(None, {})
    assert (got.root, got.origin, got.samples, got.files) == (SAMPLES, "samples", True, 343)
    assert got.describe().startswith(f"{SAMPLES} (samples; sample data, 343 files verified")


def test_a_folder_with_none_of_the_sub_folders_is_refused_with_status_2(tmp_path, capsys):
    from nec_cli.main import main

    (tmp_path / "data" / "images").mkdir(parents=True)
    with pytest.raises(InvalidInput, match="none of the expected sub-folders eurosat_rgb, "):
        resolve_data(tmp_path / "data")
    argv = ["demo", "--data", str(tmp_path / "data"), "--work", str(tmp_path / "w")]
    assert main([*argv, "--skip-workflow", "-q"]) == 2
    err = capsys.readouterr().err
    assert f"--data {tmp_path / 'data'}: none of the expected sub-folders" in err
    assert ", ".join(FOLDERS) in err
    assert main(["demo", "--data", str(tmp_path / "nope"), "--work", str(tmp_path / "w")]) == 2
    assert "no such directory" in capsys.readouterr().err
    with pytest.raises(InvalidInput, match=r"\$NEC_DATA .*nope: no such directory"):
        resolve_data(None, {"NEC_DATA": str(tmp_path / "nope")})


def test_a_changed_sample_file_is_refused_by_name(tmp_path, capsys):
    from nec_cli.main import main

    root = _folder(tmp_path)
    assert open_data(root).files == 2
    scene = root / "landsat" / "1985.tif"
    data = bytearray(scene.read_bytes())
    data[len(data) // 2] ^= 1
    scene.write_bytes(bytes(data))
    with pytest.raises(InvalidInput, match=r"landsat/1985\.tif: SHA-256 [0-9a-f]{64} is not the"):
        open_data(root)
    argv = ["demo", "--data", str(root), "--work", str(tmp_path / "w"), "--skip-workflow"]
    assert main(argv) == 2
    assert f"{scene}: SHA-256" in capsys.readouterr().err
    scene.unlink()
    with pytest.raises(InvalidInput, match=rf"{scene}: listed in .*{MANIFEST} but missing"):
        open_data(root)


def test_unlisted_files_and_bad_manifests_are_refused(tmp_path):
    root = _folder(tmp_path)
    (root / "landsat" / "extra.tif").write_bytes(b"II*\x00")
    with pytest.raises(InvalidInput, match=r"landsat/extra\.tif: not listed in"):
        open_data(root)
    (root / "landsat" / "extra.tif").unlink()
    (root / "README.md").write_text("documentation is not checksummed")
    assert open_data(root).files == 2
    lines = (root / MANIFEST).read_text().splitlines()
    for bad in ("0" * 64 + "  ../outside.tif", "xyz  naip/a.tif", "0" * 64 + " one-space.tif"):
        (root / MANIFEST).write_text("\n".join([*lines, bad]) + "\n")
        with pytest.raises(InvalidInput, match=f"{MANIFEST}:3: not a '<sha256>  <relative path>'"):
            open_data(root)


def test_the_rvq_demo_takes_the_test_images_the_samples_hold(capsys):
    from nec_dev.demo_rvq import s2_workflow_inputs, test_images

    weights = ROOT / "weights" / "sentinel2"
    images = test_images(weights, SAMPLES)
    assert len(images) == 24 + 1 + 2  # EuroSAT MS, BigEarthNet, SSL4EO
    assert all(a.shape[0] == 10 for _, a in images)
    assert "[rvq] 27 of the 29 test images present" in capsys.readouterr().out
    ((name, path),) = s2_workflow_inputs(SAMPLES, Path("unused"), weights)
    assert path == SAMPLES / "ssl4eo_s12" / name
    with pytest.raises(InvalidInput, match="none of the rvq-s2 test images"):
        test_images(weights, SAMPLES / "naip")


# ---------------------------------------------------------------------------- a bare clone


def _import_tree(clone: Path, dest: Path) -> Path:
    """The clone's packages under their import names (links), to put first on PYTHONPATH."""
    for project, prefix in ((clone, Path()), (clone / "dev", Path("dev"))):
        setup = tomllib.loads((project / "pyproject.toml").read_text())["tool"]["setuptools"]
        for name, folder in setup["package-dir"].items():
            (dest / name).symlink_to(clone / prefix / folder, target_is_directory=True)
    return dest


@pytest.mark.slow
def test_a_bare_clone_runs_the_demo_on_its_own_samples(tmp_path):
    """``git clone`` with nothing beside it, then the demo's in-process part, its own code."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    assert not (tmp_path / "shared").exists() and (clone / "data" / "samples" / MANIFEST).is_file()
    # The clone's own C extension, built in place (the checkout's .so is not in git).
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=clone,
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert list((clone / "nec_serve").glob(f"_rans{sysconfig.get_config_var('EXT_SUFFIX')}"))
    path = tmp_path / "path"
    path.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "NEC_DATA"}
    env.update(PYTHONPATH=str(_import_tree(clone, path)), PYTHONWARNINGS="ignore")
    argv = ["demo", "--skip-workflow", "-q", "--work", str(tmp_path / "work")]
    out = subprocess.run(
        [sys.executable, "-m", "nec_cli", *argv],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    first = out.stdout.splitlines()[0]
    assert first.startswith(f"[data] {clone / 'data' / 'samples'} (samples; sample data, 343 ")
    assert "[eurosat_test] 300 of the 2,427 test images present" in out.stdout
    for name in ("eurosat_test", "eurosat_ms", "bigearthnet", "ssl4eo"):
        assert f"\n{name} | " in out.stdout, name
    assert (tmp_path / "work" / "eurosat_test.classes.json").is_file()
    # The RVQ family on the test images the samples hold, each rate decoded where it lay.
    assert "[rvq] 27 of the 29 test images present" in out.stdout
    for n in (1, 2, 4, 8):
        assert f"\n{n} | " in out.stdout and (tmp_path / "work" / f"s2_test.c{n}.tar").is_file()
    assert out.stdout.count(" | 27/27 | ") == 4
