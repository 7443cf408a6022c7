"""The design card's layout: ``passes/`` installs as ``onnxslim_cv.passes``, never as ``passes``."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(out)],
        capture_output=True,
        text=True,
    )
    if build.returncode != 0:
        pytest.fail(f"wheel build failed: {build.stderr[-2000:]}")
    (path,) = out.glob("*.whl")
    return zipfile.ZipFile(path).namelist()


def test_passes_ship_inside_the_package_only(wheel):
    top_level = {name.split("/")[0] for name in wheel}
    assert top_level == {"onnxslim_cv", "onnxslim_cv-0.1.0.dist-info"}
    for module in (REPO / "passes").glob("*.py"):
        assert f"onnxslim_cv/passes/{module.name}" in wheel


def test_demo_assets_ship_as_package_data(wheel):
    for asset in ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz", "digits_test_labels.npy"):
        assert f"onnxslim_cv/data/{asset}" in wheel


def test_console_script_is_declared(wheel):
    assert any(name.endswith("entry_points.txt") for name in wheel)


def test_the_installed_passes_package_is_the_repo_folder():
    import onnxslim_cv.passes

    assert Path(onnxslim_cv.passes.__file__).resolve().parent == REPO / "passes"
