"""The shared real-model registry: files, preprocessing against MODELS.md, data splits.

Skipped as a whole when the shared folder (``../shared/models`` or
``$ONNXSLIM_CV_SHARED_MODELS``) is absent. Accuracy checks use small prefixes of the labelled
sets so the module runs in seconds; ``python tools/evaluate.py --all`` checks the full sets.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxslim_cv import runtime
from onnxslim_cv.calibration import CalibrationData
from onnxslim_cv.specs import TensorSpec
from onnxslim_cv.testing import zoo

pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(zoo.shared_models_dir() is None, reason="shared models folder absent"),
]

KEYS = list(zoo.ZOO)
EXACT_TEST_VECTORS = [key for key in KEYS if key != "ppocr_cls"]
EXPECTED_KEYS = {"squeezenet", "resnet20", "mnist", "ppocr_det", "ppocr_cls", "ultraface", "fastestdet", "superres"}


@pytest.fixture(scope="module")
def sessions():
    cache = {}

    def get(key):
        if key not in cache:
            cache[key] = runtime.make_session(str(zoo.get(key).model_path()))
        return cache[key]

    return get


def _top1(key: str, session, limit: int) -> float:
    entry = zoo.get(key)
    hits = total = 0
    for feed, label in entry.labelled(limit):
        hits += int(runtime.run(session, feed)[0].reshape(-1).argmax() == label)
        total += 1
    assert total == limit
    return hits / total


def _test_vector_input(entry: zoo.SharedModel) -> np.ndarray:
    folder, source = zoo.reference_test_set(entry)
    if "/" in source:
        return entry.preprocess_file(zoo.shared_models_dir() / source)
    return next(entry.inputs(offset=entry.sample_names().index(source)))[entry.input_name]


def test_registry_keys_and_fields():
    assert set(zoo.ZOO) == EXPECTED_KEYS
    for key, entry in zoo.ZOO.items():
        assert entry.key == key and zoo.get(key) is entry
        assert entry.task in zoo.TASKS
        assert len(entry.input_shape) == 4 and entry.input_shape[0] == 1
    assert [e.key for e in zoo.available()] == KEYS
    with pytest.raises(KeyError, match="known"):
        zoo.get("resnet50")


def test_missing_env_folder_means_absent(monkeypatch, tmp_path):
    monkeypatch.setenv(zoo.ENV_VAR, str(tmp_path / "nonexistent"))
    assert zoo.shared_models_dir() is None
    assert zoo.available() == []
    monkeypatch.setenv(zoo.ENV_VAR, str(tmp_path))
    assert zoo.shared_models_dir() == tmp_path.resolve()
    assert zoo.available() == []  # the folder exists but holds no model


@pytest.mark.parametrize("key", KEYS)
def test_model_runs_at_its_input_shape(key, sessions):
    entry = zoo.get(key)
    assert entry.model_path().is_file()
    assert zoo.find_by_path(entry.model_path()) is entry
    feed = next(entry.inputs(1))
    assert feed[entry.input_name].shape == entry.input_shape
    assert feed[entry.input_name].dtype == np.float32
    outputs = runtime.run(sessions(key), feed)
    assert outputs and all(np.isfinite(o).all() for o in outputs)


@pytest.mark.parametrize("key", EXACT_TEST_VECTORS)
def test_preprocessing_reproduces_test_vector(key, sessions):
    """The test sets' inputs are real images preprocessed as MODELS.md says."""
    entry = zoo.get(key)
    folder, _ = zoo.reference_test_set(entry)
    expected_input = zoo.read_tensor(folder / "input_0.pb")
    ours = _test_vector_input(entry)
    np.testing.assert_allclose(ours, expected_input, rtol=0, atol=1e-5)
    outputs = runtime.run(sessions(key), {entry.input_name: ours})
    for index, output in enumerate(outputs):
        np.testing.assert_allclose(output, zoo.read_tensor(folder / f"output_{index}.pb"), rtol=1e-3, atol=1e-4)


def test_ppocr_cls_crop_is_close_to_test_vector(sessions):
    """Our crop of the first text line approximates PaddleOCR's rotated-box warp; same decision."""
    entry = zoo.get("ppocr_cls")
    folder, _ = zoo.reference_test_set(entry)
    ours = _test_vector_input(entry)
    assert float(np.abs(ours - zoo.read_tensor(folder / "input_0.pb")).mean()) < 0.05
    expected = zoo.read_tensor(folder / "output_0.pb")
    assert runtime.run(sessions("ppocr_cls"), {"x": ours})[0].argmax() == expected.argmax()


@pytest.mark.parametrize("key", ["resnet20", "ultraface", "fastestdet", "ppocr_det"])
def test_image_preprocess_equivalent_is_exact(key):
    """For stretch-resized models the CLI's ImagePreprocess gives the same tensor as the zoo."""
    from PIL import Image

    entry = zoo.get(key)
    assert entry.preprocess_exact
    _, source = zoo.reference_test_set(entry)
    path = zoo.shared_models_dir() / source
    spec = TensorSpec(entry.input_name, entry.input_shape, np.dtype(np.float32))
    with Image.open(path) as image:
        via_cli = entry.preprocess.apply(image, spec)[None]
    np.testing.assert_allclose(via_cli, entry.preprocess_file(path), rtol=0, atol=1e-6)


def test_resnet20_top1_on_500_cifar(sessions):
    assert 0.76 <= _top1("resnet20", sessions("resnet20"), 500) <= 0.86  # MODELS.md: 80.96 % on 2,500


def test_squeezenet_top1_on_100_imagenet(sessions):
    assert 0.45 <= _top1("squeezenet", sessions("squeezenet"), 100) <= 0.75  # 59.8 % on 500; SE ~5 points


def test_mnist_top1_on_1000_digits(sessions):
    assert _top1("mnist", sessions("mnist"), 1000) >= 0.97  # MODELS.md: 98.34 % on 5,000


def test_ppocr_cls_text_lines(sessions):
    assert _top1("ppocr_cls", sessions("ppocr_cls"), 12) == 1.0  # MODELS.md: 12/12


def test_cifar_prefix_is_class_balanced():
    labels = [label for _, label in zoo.get("resnet20").labelled(50)]
    assert np.bincount(labels, minlength=10).tolist() == [5] * 10


def test_unlabelled_models_have_no_labels_but_inputs():
    for key in ("ppocr_det", "ultraface", "fastestdet", "superres"):
        entry = zoo.get(key)
        assert not entry.is_labelled
        assert list(entry.labelled(3)) == []
        assert len(list(entry.inputs(2))) == 2


@pytest.mark.parametrize("key", KEYS)
def test_calibration_data(key):
    entry = zoo.get(key)
    data = entry.calibration(3)
    assert isinstance(data, CalibrationData)
    assert data.count() == 3
    items = list(data)
    assert len(items) == 3
    for item in items:
        assert list(item) == [entry.input_name]
        assert item[entry.input_name].shape == entry.input_shape
    assert not np.array_equal(items[0][entry.input_name], items[1][entry.input_name])


@pytest.mark.parametrize("key", KEYS)
def test_calibration_is_disjoint_from_an_evaluation_prefix(key):
    entry = zoo.get(key)
    pool = len(entry.sample_names())
    evaluation = min(pool // 2, 100)
    calibration = min(pool - evaluation, 16)
    eval_names = set(entry.sample_names(evaluation))
    calib_names = entry.calibration_sample_names(calibration)
    assert len(calib_names) == calibration
    assert eval_names.isdisjoint(calib_names)
    shifted = entry.calibration_sample_names(2, offset=1)
    assert shifted == entry.calibration_sample_names(3)[1:]


def test_superres_pool_starts_with_the_psnr_images():
    entry = zoo.get("superres")
    psnr_names = {p.name for p in zoo.superres_psnr_files()}
    assert len(psnr_names) == 10  # MODELS.md: 10 ImageNet images of at least 672 px
    assert set(entry.sample_names(10)) == psnr_names


def test_text_regions_on_sample(sessions):
    """MODELS.md: 6 text regions (>= 30 px at prob > 0.3) on sample.jpg at 544x800."""
    image = zoo.open_rgb(zoo.shared_models_dir() / "ocr" / "images" / "sample.jpg")
    feed = zoo.ppocr_det_preprocess_native(image)
    assert feed.shape == (1, 3, 544, 800)
    probability = runtime.run(sessions("ppocr_det"), {"x": feed})[0][0, 0]
    assert len(zoo.text_regions(probability)) == 6
    assert abs(float(probability.mean()) - 0.040) < 5e-4
