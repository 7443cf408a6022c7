"""tools/bench_sparsify.py: one small run on MNIST (skipped when the shared models folder is
absent) and the exit status without the shared folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from onnxslim_cv.testing import zoo

from .conftest import TOOLS, load_tool

SCRIPT = TOOLS / "bench_sparsify.py"


@pytest.fixture(scope="module")
def bench_sparsify():
    return load_tool("bench_sparsify")


@pytest.mark.shared
@pytest.mark.skipif(zoo.shared_models_dir() is None, reason="shared models folder absent")
def test_mnist_small_run(bench_sparsify, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--models", "mnist", "--sparsities", "0.5", "--eval-limit", "200", "--calib", "16", "--json", str(out)]
    assert bench_sparsify.main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("Command: `python tools/bench_sparsify.py --models mnist --sparsities 0.5")
    assert "### mnist" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    labels = [(cells[0], cells[1]) for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows)]
    assert ("fp32", "") in labels
    for config in ("50% uniform", "2:4"):
        for recovery in ("none (magnitude)", "obs (reconstruction)"):
            assert (config, recovery) in labels, labels
    assert "error:" not in text
    assert "yes (1/1 layers)" in text  # 2:4 holds on mnist's one eligible layer, both recoveries
    assert "### Targets" in text and "2:4 holds exactly on every eligible layer" in text

    results = json.loads(out.read_text())
    (row,) = results["models"]
    assert row["eval_samples"] == 200 and row["calibration_samples"] == 16
    cells = {cell["name"]: cell for cell in row["cells"]}
    assert set(cells) == {"uniform0.5.none", "uniform0.5.obs", "hessian0.5.obs", "nm2of4.none", "nm2of4.obs"}
    for cell in cells.values():
        assert cell["status"] == "ok", cell.get("traceback")
        assert cell["sparse_storage"]["ok"]
        assert abs(cell["zeros_sparsified_layers"] - 0.5) < 0.01
        assert 0 < cell["zeros_all_weights"] < 0.5  # first and last layers stay dense
        assert cell["pass_seconds"] >= 0 and cell["size"] > 0 and cell["deflate"] < row["fp32"]["deflate"]
    for name in ("nm2of4.none", "nm2of4.obs"):
        nm = cells[name]["nm_check"]
        assert nm["ok"] and nm["hold"] == nm["layers"] == nm["eligible"] == 1
    for cell in cells.values():  # a classifier is also compared with fp32: agreement and KL
        agreement = cell["quality"]["agreement"]
        assert 0.9 < agreement["top1_agreement"] <= 1 and 0 <= agreement["kl_mean"] < 1, agreement


def test_closeness_text_reads_agreement_and_kl(bench_sparsify):
    cell = {"quality": {"agreement": {"top1_agreement": 0.88, "cosine_mean": 0.99, "kl_mean": 0.05548}}}
    assert bench_sparsify.closeness_text(cell) == "; top-1 agreement with fp32 88.00%, KL 0.0555"
    assert bench_sparsify.closeness_text({"quality": {"agreement": None}}) == ""
    assert bench_sparsify.closeness_text({"status": "error"}) == ""


def test_nm_check_catches_a_broken_pattern(bench_sparsify):
    """The independent N:M check reads the file's own layout, so a violation is reported."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    weight = np.ones((4, 8, 1, 1), np.float32)
    weight[:, 0::2] = 0  # 2 of every 4 input channels zero: holds 2:4
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 2, 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 2, 2])],
        [numpy_helper.from_array(weight, "w")],
    )
    proto = helper.make_model(graph)
    layers = bench_sparsify.file_layers(proto, ["w"])
    from onnxslim_cv.sparsity import holds_nm

    assert holds_nm(layers["w"], weight, 2, 4)
    weight[0, 0] = 1.0
    assert not holds_nm(layers["w"], weight, 2, 4)
    assert bench_sparsify.weight_zeros({"w": weight, "b": np.zeros(4, np.float32)}) == (15, 32)


def test_exits_2_without_shared_folder(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items()}
    env[zoo.ENV_VAR] = str(tmp_path / "missing")
    result = subprocess.run([sys.executable, str(SCRIPT), "--models", "mnist"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "shared models folder is absent" in result.stderr
    assert result.stdout == ""


@pytest.mark.shared
@pytest.mark.skipif(zoo.shared_models_dir() is None, reason="shared models folder absent")
def test_folds_calibrate_on_disjoint_blocks_and_evaluate_on_the_rest(bench_sparsify):
    benchlib = sys.modules["benchlib"]
    entry = zoo.ZOO["squeezenet"]
    pool = entry.sample_names()
    blocks = []
    for k in range(4):
        fold = benchlib.FoldedEntry(entry, k, 4, 128)
        calibration = entry.calibration_sample_names(fold.size, offset=k * fold.size)
        evaluation = [name for i, name in enumerate(pool) if i not in fold.skip]
        assert fold.size == len(pool) // 4 and fold.eval_samples == len(evaluation) == len(pool) - fold.size
        assert sorted(calibration + evaluation) == sorted(pool)
        blocks.append(set(calibration))
        if k == 0:  # the back of the pool, as the fixed split's calibration
            assert fold.skip == set(range(len(pool) - fold.size, len(pool)))
    assert len(set.union(*blocks)) == 4 * fold.size  # the blocks do not overlap
    assert sum(1 for _ in fold.labelled()) == fold.eval_samples


def test_fold_of_a_model_without_its_own_labelled_pool_exits_2(bench_sparsify, capsys):
    if zoo.shared_models_dir() is None:
        pytest.skip("shared models folder absent")
    assert bench_sparsify.main(["--models", "ppocr_cls", "--fold", "0/4"]) == 2
    assert "cannot be folded" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["4/4", "1/1", "a/b", "2"])
def test_bad_fold_exits_2(bench_sparsify, text):
    with pytest.raises(SystemExit) as info:
        bench_sparsify.parse_args(["--fold", text])
    assert info.value.code == 2
