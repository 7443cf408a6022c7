"""Tests for calibration/validation inputs: sources, streaming, validation, preprocessing, CLI glue."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnxslim_cv import calibration as cal
from onnxslim_cv.calibration import (
    CalibrationData,
    ImagePreprocess,
    add_data_arguments,
    as_ort_reader,
    data_from_args,
    from_iterable,
    from_ort_reader,
    from_path,
    preprocess_from_args,
    random_data,
)
from onnxslim_cv.errors import UserError
from onnxslim_cv.specs import TensorSpec

F32 = np.dtype(np.float32)


def spec(name="x", shape=("N", 3, 2, 2), dtype=F32) -> TensorSpec:
    return TensorSpec(name, shape, np.dtype(dtype))


X = [spec()]
TWO = [spec("a"), spec("b", ("N", 5), np.int64)]


def arrays(data, key="x"):
    return [item[key] for item in data]


def stacked(data, key="x"):
    return np.concatenate(arrays(data, key))


def rand(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def test_npy_single_sample_gets_batch_dim(tmp_path):
    sample = rand(3, 2, 2)
    np.save(tmp_path / "s.npy", sample)
    data = from_path(tmp_path / "s.npy", X)
    (item,) = list(data)
    assert item["x"].shape == (1, 3, 2, 2)
    np.testing.assert_array_equal(item["x"][0], sample)
    assert data.count() == 1
    assert data.kind == "arrays"


def test_npy_batch_is_chunked_and_memory_mapped(tmp_path, monkeypatch):
    batch = rand(70, 3, 2, 2)
    np.save(tmp_path / "b.npy", batch)
    calls = []
    real_load = np.load

    def spy_load(*args, **kwargs):
        calls.append(kwargs.get("mmap_mode"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy_load)
    data = from_path(tmp_path / "b.npy", X)
    assert data.count() == 70
    assert data.description.endswith("(70 samples)")
    items = list(data)
    assert [a.shape[0] for a in arrays(items)] == [32, 32, 6]
    np.testing.assert_array_equal(stacked(items), batch)
    assert calls == ["r"]  # one open per iteration, through a memmap
    assert all(type(item["x"]) is np.ndarray for item in items)  # chunks are copied out of the map


def test_npz_batch_and_sample(tmp_path):
    a, b = rand(40, 3, 2, 2), np.arange(200, dtype=np.int64).reshape(40, 5)
    np.savez(tmp_path / "batch.npz", a=a, b=b)
    data = from_path(tmp_path / "batch.npz", TWO)
    items = list(data)
    assert [i["a"].shape[0] for i in items] == [32, 8]
    np.testing.assert_array_equal(stacked(items, "a"), a)
    np.testing.assert_array_equal(stacked(items, "b"), b)
    assert data.count() == 40

    np.savez_compressed(tmp_path / "one.npz", a=a[0], b=b[0])
    (item,) = list(from_path(tmp_path / "one.npz", TWO))
    assert item["a"].shape == (1, 3, 2, 2) and item["b"].shape == (1, 5)


def test_npz_uncompressed_members_are_memory_mapped(tmp_path):
    a = rand(10, 3, 2, 2)
    np.savez(tmp_path / "plain.npz", x=a)
    np.savez_compressed(tmp_path / "packed.npz", x=a)
    plain = cal._load_npz(tmp_path / "plain.npz")["x"]
    packed = cal._load_npz(tmp_path / "packed.npz")["x"]
    assert isinstance(plain, np.memmap)
    np.testing.assert_array_equal(plain, a)
    np.testing.assert_array_equal(packed, a)


def test_folder_of_npy_with_and_without_batch_dim(tmp_path):
    (tmp_path / "sub").mkdir()
    s1, batch, s2 = rand(3, 2, 2, seed=1), rand(2, 3, 2, 2, seed=2), rand(3, 2, 2, seed=3)
    np.save(tmp_path / "a.npy", s1)
    np.save(tmp_path / "b.npy", batch)
    np.save(tmp_path / "sub" / "c.npy", s2)
    data = from_path(tmp_path, X)
    assert [a.shape for a in arrays(data)] == [(1, 3, 2, 2), (2, 3, 2, 2), (1, 3, 2, 2)]
    np.testing.assert_array_equal(stacked(data), np.concatenate([s1[None], batch, s2[None]]))
    assert data.count() == 4
    assert data.description.endswith("(3 array files)")


def test_folder_of_npz(tmp_path):
    np.savez(tmp_path / "0.npz", a=rand(3, 2, 2), b=np.zeros(5, np.int64))  # one sample, no batch dim
    for i in (1, 2):
        np.savez(tmp_path / f"{i}.npz", a=rand(2, 3, 2, 2, seed=i), b=np.full((2, 5), i, np.int64))
    data = from_path(tmp_path, TWO)
    assert data.count() == 1 + 2 + 2
    items = list(data)
    assert [i["b"].shape[0] for i in items] == [1, 2, 2]
    assert [int(i["b"][0, 0]) for i in items] == [0, 1, 2]


def make_pixels(height=4, width=6) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([10 * rows + cols, 100 + cols, 200 - 10 * rows], axis=-1).astype(np.uint8)


def save_png(path: Path, pixels: np.ndarray | None = None) -> np.ndarray:
    pixels = make_pixels() if pixels is None else pixels
    Image.fromarray(pixels, "RGB").save(path)
    return pixels


def test_folder_of_images(tmp_path):
    (tmp_path / "nested").mkdir()
    save_png(tmp_path / "b.PNG")
    Image.fromarray(make_pixels()).save(tmp_path / "a.bmp")
    save_png(tmp_path / "nested" / "c.png")
    (tmp_path / ".DS_Store").write_bytes(b"junk")  # hidden files are ignored
    data = from_path(tmp_path, [spec(shape=(1, 3, 4, 6))])
    assert data.count() == 3 and data.kind == "images"
    assert data.description == f"{tmp_path}/ (3 images)"
    items = list(data)
    assert [i["x"].shape for i in items] == [(1, 3, 4, 6)] * 3
    expected = make_pixels().astype(np.float32).transpose(2, 0, 1)
    for item in items:
        np.testing.assert_array_equal(item["x"][0], expected)


def test_single_image_file_is_one_sample(tmp_path):
    save_png(tmp_path / "one.png")
    data = from_path(tmp_path / "one.png", [spec(shape=(1, 3, 4, 6))])
    assert data.count() == 1 and len(list(data)) == 1


def test_uint8_model_gets_raw_pixels(tmp_path):
    save_png(tmp_path / "a.png")
    (item,) = from_path(tmp_path, [spec(shape=(1, 4, 6, 3), dtype=np.uint8)], preprocess=ImagePreprocess(layout="nhwc"))
    assert item["x"].dtype == np.uint8
    np.testing.assert_array_equal(item["x"][0], make_pixels())
    scaled_prep = ImagePreprocess(layout="nhwc", scale=1 / 255)
    scaled = from_path(tmp_path, [spec(shape=(1, 4, 6, 3), dtype=np.uint8)], preprocess=scaled_prep)
    with pytest.raises(UserError, match="expects uint8"):
        list(scaled)


# --------------------------------------------------------------------------------------------
# Limit, batches, re-iteration
# --------------------------------------------------------------------------------------------


def three_batches_of_three(tmp_path) -> np.ndarray:
    all_samples = rand(9, 3, 2, 2)
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", all_samples[3 * i : 3 * i + 3])
    return all_samples


def test_limit_slices_across_item_boundaries(tmp_path):
    all_samples = three_batches_of_three(tmp_path)
    data = from_path(tmp_path, X, limit=5)
    assert [a.shape[0] for a in arrays(data)] == [3, 2]
    np.testing.assert_array_equal(stacked(data), all_samples[:5])
    assert data.count() == 5
    assert "first 5 used" in data.description
    assert from_path(tmp_path, X, limit=6).count() == 6
    assert from_path(tmp_path, X, limit=100).count() == 9
    assert [a.shape[0] for a in arrays(from_path(tmp_path, X, limit=3))] == [3]


def test_limited_view_for_per_pass_defaults(tmp_path):
    three_batches_of_three(tmp_path)
    data = from_path(tmp_path, X, limit=7)
    assert data.limited(4).count() == 4
    assert data.limited(100).count() == 7
    assert data.count() == 7


@pytest.mark.parametrize("limit", [0, -3])
def test_limit_must_be_positive(tmp_path, limit):
    three_batches_of_three(tmp_path)
    with pytest.raises(UserError, match="positive"):
        from_path(tmp_path, X, limit=limit)


def test_batches_split_and_concatenate():
    samples = rand(9, 3, 2, 2)
    items = [{"x": samples[0:3]}, {"x": samples[3:5]}, {"x": samples[5:9]}]
    data = from_iterable(items, X)
    assert [b["x"].shape[0] for b in data.batches(4)] == [4, 4, 1]
    assert [b["x"].shape[0] for b in data.batches(2)] == [2, 2, 2, 2, 1]
    assert [b["x"].shape[0] for b in data.batches(100)] == [9]
    for size in (1, 2, 4, 100):
        np.testing.assert_array_equal(np.concatenate([b["x"] for b in data.batches(size)]), samples)
    with pytest.raises(UserError, match="batch size"):
        list(data.batches(0))


def test_batches_flush_when_dynamic_dims_change():
    dynamic = [spec(shape=("N", 3, "H", "W"))]
    items = [{"x": rand(3, 4, 4)}, {"x": rand(3, 4, 4)}, {"x": rand(3, 8, 8)}]
    shapes = [b["x"].shape for b in from_iterable(items, dynamic).batches(4)]
    assert shapes == [(2, 3, 4, 4), (1, 3, 8, 8)]


def make_reiterable_sources(tmp_path):
    """name -> CalibrationData, one per kind of source."""
    (tmp_path / "npy").mkdir()
    (tmp_path / "img").mkdir()
    np.save(tmp_path / "one.npy", rand(40, 3, 2, 2))
    np.savez(tmp_path / "one.npz", x=rand(40, 3, 2, 2))
    three_batches_of_three(tmp_path / "npy")
    save_png(tmp_path / "img" / "a.png")
    save_png(tmp_path / "img" / "b.png", make_pixels()[::-1].copy())
    items = [{"x": rand(3, 2, 2, seed=i)} for i in range(4)]
    return {
        "npy": from_path(tmp_path / "one.npy", X),
        "npz": from_path(tmp_path / "one.npz", X),
        "folder": from_path(tmp_path / "npy", X, limit=7),
        "images": from_path(tmp_path / "img", [spec(shape=(1, 3, 4, 6))]),
        "list": from_iterable(items, X),
        "callable": from_iterable(lambda: iter(items), X),
        "reader": from_ort_reader(RewindableReader(items), X),
        "random": random_data(X, 5, batch_size=2),
    }


@pytest.mark.parametrize("name", ["npy", "npz", "folder", "images", "list", "callable", "reader", "random"])
def test_every_source_is_reiterable(tmp_path, name):
    data = make_reiterable_sources(tmp_path)[name]
    first, second = list(data), list(data)
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a["x"], b["x"])


def test_one_shot_iterator_works_once():
    generator = ({"x": rand(3, 2, 2, seed=i)} for i in range(3))
    data = from_iterable(generator, X)
    assert len(list(data)) == 3
    with pytest.raises(UserError, match="already consumed; pass a list or a function"):
        list(data)


def test_limit_does_not_over_read_one_shot_sources():
    pulled = []

    def generate():
        for i in range(10):
            pulled.append(i)
            yield {"x": rand(3, 2, 2)}

    assert len(list(from_iterable(generate(), X, limit=2))) == 2
    assert pulled == [0, 1]


# --------------------------------------------------------------------------------------------
# onnxruntime readers
# --------------------------------------------------------------------------------------------


class RewindableReader:
    def __init__(self, items):
        self.items, self.position, self.rewinds = items, 0, 0

    def get_next(self):
        if self.position >= len(self.items):
            return None
        self.position += 1
        return self.items[self.position - 1]

    def rewind(self):
        self.rewinds += 1
        self.position = 0


class OneShotReader(RewindableReader):
    rewind = None  # type: ignore[assignment]


def test_from_ort_reader_with_and_without_rewind():
    items = [{"x": rand(2, 3, 2, 2, seed=i)} for i in range(3)]
    reader = RewindableReader(items)
    data = from_ort_reader(reader, X)
    assert len(list(data)) == 3 and len(list(data)) == 3
    assert reader.rewinds == 2

    one_shot = from_ort_reader(OneShotReader(items), X)
    np.testing.assert_array_equal(stacked(one_shot), np.concatenate([i["x"] for i in items]))
    with pytest.raises(UserError, match="already consumed"):
        list(one_shot)


def test_as_ort_reader_batches_and_rewinds():
    from onnxruntime.quantization import CalibrationDataReader

    samples = rand(5, 3, 2, 2)
    reader = as_ort_reader(from_iterable([{"x": samples}], X), batch_size=2)
    assert isinstance(reader, CalibrationDataReader)
    assert len(reader) == 3

    def drain():
        out = []
        while (batch := reader.get_next()) is not None:
            out.append(batch["x"])
        return out

    first = drain()
    assert [b.shape[0] for b in first] == [2, 2, 1]
    assert reader.get_next() is None
    reader.rewind()
    second = drain()
    np.testing.assert_array_equal(np.concatenate(second), samples)
    reader.set_range(1, 2)
    assert [b.shape[0] for b in drain()] == [2]


def tiny_conv_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(rand(4, 3, 3, 3, seed=7) * 0.2, "w")
    bias = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def test_as_ort_reader_feeds_quantize_static(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import quantize_static

    tiny_conv_model(tmp_path / "fp32.onnx")
    specs = [spec(shape=("N", 3, 8, 8))]
    calib = random_data(specs, 8, seed=1)
    quantize_static(str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx"), as_ort_reader(calib, batch_size=4))
    quantized = onnx.load(tmp_path / "int8.onnx")
    assert any(node.op_type == "QuantizeLinear" for node in quantized.graph.node)
    x = next(iter(calib.batches(2)))["x"]
    session = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(tmp_path / "fp32.onnx"), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    (y_ref,) = reference.run(None, {"x": x})
    assert y.shape == (2, 4, 8, 8)
    assert np.abs(y - y_ref).max() < 0.1 * np.abs(y_ref).max()


# --------------------------------------------------------------------------------------------
# Random data
# --------------------------------------------------------------------------------------------


def test_random_data_is_deterministic_per_sample():
    specs = [spec(shape=("batch", 3, 2, 2)), spec("ids", (1, 4), np.int64), spec("mask", ("N", 4), np.bool_)]
    one = list(random_data(specs, 5, seed=3))
    again = list(random_data(specs, 5, seed=3))
    batched = list(random_data(specs, 5, seed=3, batch_size=2))
    assert [i["x"].shape[0] for i in batched] == [2, 2, 1]
    for key in ("x", "ids", "mask"):
        np.testing.assert_array_equal(np.concatenate([i[key] for i in one]), np.concatenate([i[key] for i in again]))
        np.testing.assert_array_equal(np.concatenate([i[key] for i in one]), np.concatenate([i[key] for i in batched]))
    other = np.concatenate([i["x"] for i in random_data(specs, 5, seed=4)])
    assert not np.array_equal(other, np.concatenate([i["x"] for i in one]))
    ids = np.concatenate([i["ids"] for i in one])
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 10
    assert one[0]["mask"].dtype == np.bool_
    assert random_data(specs, 5).count() == 5


def test_random_data_rejects_dynamic_non_batch_dims():
    with pytest.raises(UserError, match=r"--input-shape x:1x3x224x224"):
        random_data([spec(shape=("N", 3, "H", "W"))], 2)
    with pytest.raises(UserError, match="--input-shape"):
        random_data([spec(shape=None)], 2)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def first_item(obj, specs=X):
    return next(iter(from_iterable(obj, specs)))


def test_missing_key_names_input_and_lists_inputs():
    with pytest.raises(UserError, match=r"missing input 'b'.*inputs are: a, b"):
        first_item([{"a": rand(3, 2, 2)}], TWO)


def test_extra_key_is_rejected():
    with pytest.raises(UserError, match=r"unexpected key 'y'"):
        first_item([{"x": rand(3, 2, 2), "y": rand(1)}])
    with pytest.raises(UserError, match=r"missing input 'x' and unexpected key 'img'"):
        first_item([{"img": rand(3, 2, 2)}])


def test_wrong_rank():
    with pytest.raises(UserError, match=r"item 0 of list of 1 item: input 'x' has shape 2x3x2x2x1 .*Nx3x2x2"):
        first_item([{"x": rand(2, 3, 2, 2, 1)}])
    with pytest.raises(UserError, match=r"shape 2x2 \(2-D\)"):
        first_item([{"x": rand(2, 2)}])


def test_wrong_fixed_dim_but_batch_and_symbolic_dims_are_free():
    with pytest.raises(UserError, match=r"dim 1 is 4, expected 3"):
        first_item([{"x": rand(2, 4, 2, 2)}])
    fixed_batch = [spec(shape=(1, 3, "H", 2))]
    assert first_item([{"x": rand(5, 3, 7, 2)}], fixed_batch)["x"].shape == (5, 3, 7, 2)


def test_wrong_dtype():
    with pytest.raises(UserError, match=r"dtype int64 for input 'x', model expects float32"):
        first_item([{"x": np.zeros((3, 2, 2), np.int64)}])
    with pytest.raises(UserError, match=r"dtype float32 for input 'b', model expects int64"):
        first_item([{"a": rand(3, 2, 2), "b": rand(5)}], TWO)
    with pytest.raises(UserError, match=r"values do not fit int32"):
        first_item([{"x": np.array([[2**40]], np.int64)}], [spec(shape=("N", 1), dtype=np.int32)])


@pytest.mark.parametrize(
    "given, expected",
    [
        (np.float64, np.float32),
        (np.float16, np.float32),
        (np.float32, np.float16),
        (np.float64, np.float16),
        (np.int32, np.int64),
        (np.int64, np.int32),
        (">f4", np.float32),  # big-endian file data
    ],
)
def test_safe_casts(given, expected):
    values = np.arange(8).reshape(2, 4).astype(given)
    item = first_item([{"x": values}], [spec(shape=("N", 4), dtype=expected)])
    assert item["x"].dtype == np.dtype(expected)
    np.testing.assert_array_equal(item["x"], values.astype(expected))


def test_mismatched_batch_sizes_inside_one_item(tmp_path):
    with pytest.raises(UserError, match=r"different batch sizes \(a: 2, b: 3\)"):
        first_item([{"a": rand(2, 3, 2, 2), "b": np.zeros((3, 5), np.int64)}], TWO)
    np.savez(tmp_path / "bad.npz", a=rand(2, 3, 2, 2), b=np.zeros((3, 5), np.int64))
    with pytest.raises(UserError, match=r"bad.npz: arrays have different batch sizes"):
        list(from_path(tmp_path / "bad.npz", TWO))


def test_item_must_be_a_dict():
    with pytest.raises(UserError, match="expected a dict"):
        first_item([rand(3, 2, 2)])


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="not found"):
        from_path(tmp_path / "nope", X)


def test_empty_folder(tmp_path):
    with pytest.raises(UserError, match="folder is empty"):
        from_path(tmp_path, X)


def test_mixed_folder(tmp_path):
    np.save(tmp_path / "a.npy", rand(3, 2, 2))
    save_png(tmp_path / "b.png")
    with pytest.raises(UserError, match="mixes array files"):
        from_path(tmp_path, X)


def test_unsupported_file_types(tmp_path):
    (tmp_path / "data.pt").write_bytes(b"x")
    with pytest.raises(UserError, match=r"unsupported file type '\.pt'"):
        from_path(tmp_path / "data.pt", X)
    with pytest.raises(UserError, match=r"data.pt: unsupported file type"):
        from_path(tmp_path, X)


def test_corrupt_files_name_the_file(tmp_path):
    (tmp_path / "img").mkdir()
    save_png(tmp_path / "img" / "good.png")
    (tmp_path / "img" / "zbad.jpg").write_bytes(b"not a jpeg")
    data = from_path(tmp_path / "img", [spec(shape=(1, 3, 4, 6))])
    with pytest.raises(UserError, match=r"zbad.jpg: cannot decode image"):
        list(data)
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"bad.npy: not a readable .npy file"):
        list(from_path(tmp_path / "bad.npy", X))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"bad.npz: not a readable .npz file"):
        list(from_path(tmp_path / "bad.npz", X))


def test_pickled_arrays_are_rejected(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match=r"objects.npy: holds Python objects"):
        list(from_path(tmp_path / "objects.npy", X))


def test_npy_needs_a_one_input_model(tmp_path):
    np.save(tmp_path / "a.npy", rand(3, 2, 2))
    with pytest.raises(UserError, match=r"2 inputs \(a, b\); use .npz"):
        from_path(tmp_path / "a.npy", TWO)


def test_errors_from_files_name_the_file(tmp_path):
    np.save(tmp_path / "a.npy", rand(3, 2, 2))
    np.save(tmp_path / "b.npy", np.zeros((3, 2, 2), np.int64))
    with pytest.raises(UserError, match=r"b.npy: dtype int64 for input 'x'"):
        list(from_path(tmp_path, X))


# --------------------------------------------------------------------------------------------
# Laziness
# --------------------------------------------------------------------------------------------


def test_folder_of_arrays_loads_one_file_per_item(tmp_path, monkeypatch):
    three_batches_of_three(tmp_path)
    data = from_path(tmp_path, X)
    loads = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    iterator = iter(data)
    next(iterator)
    assert [Path(p).name for p in loads] == ["0.npy"]
    iterator.close()


def test_folder_of_images_opens_one_image_per_item(tmp_path, monkeypatch):
    for name in "abc":
        save_png(tmp_path / f"{name}.png")
    data = from_path(tmp_path, [spec(shape=(1, 3, 4, 6))])
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    assert data.count() == 3  # from the listing, no decoding
    assert opened == []
    next(iter(data))
    assert [Path(p).name for p in opened] == ["a.png"]


# --------------------------------------------------------------------------------------------
# Image preprocessing math (4x6 RGB image, pixel (r, c) = (10r + c, 100 + c, 200 - 10r))
# --------------------------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path) -> Image.Image:
    save_png(tmp_path / "img.png")
    with Image.open(tmp_path / "img.png") as img:
        img.load()
        return img


def nchw(height, width, channels=3):
    return spec(shape=("N", channels, height, width))


def test_stretch_scale_mean_std_exact(image):
    prep = ImagePreprocess(scale=0.5, mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 8.0))
    out = prep.apply(image, nchw(4, 6))
    pixels = make_pixels().astype(np.float32)
    expected = (pixels * np.float32(0.5) - np.array([1, 2, 3], np.float32)) / np.array([2, 4, 8], np.float32)
    assert out.dtype == np.float32 and out.shape == (3, 4, 6)
    np.testing.assert_array_equal(out, expected.transpose(2, 0, 1))


def test_one_mean_value_broadcasts(image):
    out = ImagePreprocess(mean=(100.0,), std=(2.0,)).apply(image, nchw(4, 6))
    np.testing.assert_array_equal(out, ((make_pixels().astype(np.float32) - 100) / 2).transpose(2, 0, 1))


def test_bgr_swaps_before_mean(image):
    out = ImagePreprocess(bgr=True, mean=(1.0, 2.0, 3.0)).apply(image, nchw(4, 6))
    pixels = make_pixels().astype(np.float32)
    np.testing.assert_array_equal(out[0], pixels[..., 2] - 1)  # B first, minus the first mean
    np.testing.assert_array_equal(out[2], pixels[..., 0] - 3)


def test_nhwc_is_nchw_transposed(image):
    first = ImagePreprocess(scale=1 / 255).apply(image, nchw(4, 6))
    nhwc = ImagePreprocess(scale=1 / 255, layout="nhwc").apply(image, spec(shape=("N", 4, 6, 3)))
    assert nhwc.shape == (4, 6, 3)
    np.testing.assert_array_equal(nhwc, first.transpose(1, 2, 0))


def test_auto_layout_follows_the_input_shape(image):
    first = ImagePreprocess(scale=1 / 255).apply(image, nchw(8, 6))
    channels_last = ImagePreprocess(scale=1 / 255).apply(image, spec(shape=("N", 8, 6, 3)))  # layout auto
    np.testing.assert_array_equal(channels_last, first.transpose(1, 2, 0))
    assert ImagePreprocess().layout_for(spec(shape=("N", 3, 4, 4))) == "nchw"  # ambiguous: the default
    assert ImagePreprocess().layout_for(spec(shape=("N", 224, 224, 1))) == "nhwc"
    assert ImagePreprocess(layout="nchw").layout_for(spec(shape=("N", 224, 224, 3))) == "nchw"  # given wins


def test_stretch_resizes_to_spec_or_given_size(image):
    assert ImagePreprocess().apply(image, nchw(8, 3)).shape == (3, 8, 3)
    assert ImagePreprocess(size=(5, 7)).apply(image, spec(shape=("N", 3, "H", "W"))).shape == (3, 5, 7)


def test_center_crop(image):
    crop = ImagePreprocess(resize_mode="center-crop", crop_ratio=1.0).apply(image, nchw(4, 4))
    np.testing.assert_array_equal(crop, make_pixels()[:, 1:5].astype(np.float32).transpose(2, 0, 1))
    # default ratio: shorter side resized to round(2 / 0.875) = 2, then a 2x2 center crop
    assert ImagePreprocess(resize_mode="center-crop").apply(image, nchw(2, 2)).shape == (3, 2, 2)
    # a wide crop from a near-square resize is padded, not failed
    assert ImagePreprocess(resize_mode="center-crop").apply(image, nchw(4, 12)).shape == (3, 4, 12)


def test_letterbox_pads_bottom_right(image):
    tall = ImagePreprocess(resize_mode="letterbox", pad_value=7.0).apply(image, nchw(8, 6))
    np.testing.assert_array_equal(tall[:, :4], make_pixels().astype(np.float32).transpose(2, 0, 1))
    assert np.all(tall[:, 4:] == 7.0)
    wide = ImagePreprocess(resize_mode="letterbox", pad_value=7.0).apply(image, nchw(4, 12))
    np.testing.assert_array_equal(wide[:, :, :6], make_pixels().astype(np.float32).transpose(2, 0, 1))
    assert np.all(wide[:, :, 6:] == 7.0)
    small = ImagePreprocess(resize_mode="letterbox", pad_value=7.0, scale=2.0).apply(image, nchw(2, 6))
    assert small.shape == (3, 2, 6)
    assert np.all(small[:, :, 3:] == 14.0)  # padding is a pixel value: it goes through scale too
    assert not np.any(small[:, :, :3] == 14.0)


def test_grayscale_for_one_channel_models(image):
    out = ImagePreprocess().apply(image, nchw(4, 6, channels=1))
    assert out.shape == (1, 4, 6)
    np.testing.assert_array_equal(out[0], np.asarray(image.convert("L"), np.float32))


def test_preprocess_errors(image):
    with pytest.raises(UserError, match="--mean has 2 values but input 'x' has 3 channel"):
        ImagePreprocess(mean=(1.0, 2.0)).apply(image, nchw(4, 6))
    with pytest.raises(UserError, match="pass --input-size HxW"):
        ImagePreprocess().apply(image, spec(shape=("N", 3, "H", "W")))
    with pytest.raises(UserError, match="images need a 4-D input"):
        ImagePreprocess().apply(image, spec(shape=("N", 3, 4)))
    with pytest.raises(UserError, match="has 4 channels"):
        ImagePreprocess().apply(image, nchw(4, 6, channels=4))
    with pytest.raises(UserError, match="resize mode"):
        ImagePreprocess(resize_mode="crop")
    with pytest.raises(UserError, match="std must not contain 0"):
        ImagePreprocess(std=(1.0, 0.0, 1.0))


def test_preprocess_errors_surface_at_construction(tmp_path):
    save_png(tmp_path / "a.png")
    with pytest.raises(UserError, match="--input-size"):
        from_path(tmp_path, [spec(shape=("N", 3, "H", "W"))])


def test_worked_example_squeezenet_caffe2(tmp_path):
    rng = np.random.default_rng(0)
    save_png(tmp_path / "a.png", rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    prep = ImagePreprocess(size=(224, 224), resize_mode="center-crop", bgr=True, mean=(104, 117, 123))
    (item,) = from_path(tmp_path, [spec("data_0", (1, 3, 224, 224))], preprocess=prep)
    x = item["data_0"]
    assert x.shape == (1, 3, 224, 224)
    with Image.open(tmp_path / "a.png") as img:  # shorter side 300 -> 256, long side 400 -> 341
        resized = np.asarray(img.convert("RGB").resize((341, 256), Image.Resampling.BILINEAR), np.float32)
    top, left = round((256 - 224) / 2), round((341 - 224) / 2)
    crop = resized[top : top + 224, left : left + 224, ::-1] - np.array([104, 117, 123], np.float32)
    np.testing.assert_array_equal(x[0], crop.transpose(2, 0, 1))


def test_worked_example_cifar_resnet20(tmp_path):
    save_png(tmp_path / "a.png", make_pixels(32, 32))
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    prep = ImagePreprocess(size=(32, 32), scale=1 / 255, mean=mean, std=std)
    (item,) = from_path(tmp_path, [spec(shape=("N", 3, 32, 32))], preprocess=prep)
    expected = (make_pixels(32, 32).astype(np.float32) * np.float32(1 / 255) - np.array(mean, np.float32)) / np.array(
        std, np.float32
    )
    np.testing.assert_array_equal(item["x"][0], expected.transpose(2, 0, 1))


# --------------------------------------------------------------------------------------------
# CLI glue
# --------------------------------------------------------------------------------------------


def parse(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_flags_build_the_worked_examples():
    squeezenet = preprocess_from_args(
        parse("--resize-mode", "center-crop", "--input-size", "224", "--bgr", "--mean", "104,117,123")
    )
    assert squeezenet == ImagePreprocess(size=(224, 224), resize_mode="center-crop", bgr=True, mean=(104, 117, 123))
    cifar = preprocess_from_args(
        parse(
            *("--input-size", "32x32", "--scale", "1/255"),
            *("--mean", "0.4914,0.4822,0.4465", "--std", "0.2023,0.1994,0.2010"),
        )
    )
    assert cifar.size == (32, 32) and cifar.scale == pytest.approx(1 / 255) and cifar.std == (0.2023, 0.1994, 0.2010)
    assert preprocess_from_args(parse()) == ImagePreprocess()
    assert preprocess_from_args(parse("--input-size", "224,320")).size == (224, 320)
    assert preprocess_from_args(parse("--layout", "nhwc", "--crop-ratio", "0.9")).layout == "nhwc"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--input-size", "0x3"], "positive"),
        (["--input-size", "ax3"], "HxW"),
        (["--input-size", "1x2x3"], "HxW"),
        (["--mean", "a,b"], "--mean expects a number"),
        (["--mean", "1,,2"], "comma-separated"),
        (["--std", "1,0,1"], "must not contain 0"),
        (["--scale", "1/0"], "--scale expects a number"),
        (["--scale", "-1"], "positive"),
        (["--crop-ratio", "1.5"], r"\(0, 1\]"),
    ],
)
def test_cli_bad_values(argv, message):
    with pytest.raises(UserError, match=message):
        preprocess_from_args(parse(*argv))


def test_help_teaches_order_and_examples():
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    text = parser.format_help()
    for needle in ("--calib", "--calib-size", "1/255", "104,117,123", "center-crop", "letterbox", "(x - --mean)"):
        assert needle in text


def test_data_from_args(tmp_path):
    assert data_from_args(parse(), X) is None
    (tmp_path / "arr").mkdir()
    three_batches_of_three(tmp_path / "arr")
    data = data_from_args(parse("--calib", str(tmp_path / "arr"), "--calib-size", "4"), X)
    assert isinstance(data, CalibrationData) and data.count() == 4
    with pytest.raises(UserError, match="--calib-size"):
        data_from_args(parse("--calib", str(tmp_path / "arr"), "--calib-size", "0"), X)
    with pytest.raises(UserError, match="--mean only apply to images"):
        data_from_args(parse("--calib", str(tmp_path / "arr"), "--mean", "1"), X)
    (tmp_path / "img").mkdir()
    save_png(tmp_path / "img" / "a.png")
    images = data_from_args(parse("--calib", str(tmp_path / "img"), "--scale", "1/255"), [spec(shape=(1, 3, 4, 6))])
    np.testing.assert_allclose(next(iter(images))["x"].max(), 200 / 255, rtol=1e-6)


# -- mirrored copies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, dtype, axes",
    [
        ((1, 3, 32, 48), F32, (2, 3)),
        (("N", 3, "H", "W"), F32, (2, 3)),
        ((1, 32, 48, 3), F32, (1, 2)),
        ((1, 1, 28, 28), F32, (2, 3)),
        ((1, 3, 32, 3), F32, None),  # ambiguous
        ((1, 3, 32, 48), np.dtype(np.uint8), None),
        ((1, 3, 32), F32, None),
        ((1, 16, 8, 8), F32, None),  # a feature map, not an image
    ],
)
def test_image_axes_read_the_layout_from_the_channel_dim(shape, dtype, axes):
    assert cal.image_axes(TensorSpec("x", shape, dtype)) == axes


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("kind, copies", [("hflip", 2), ("flips", 4)])
def test_mirrored_yields_each_sample_then_its_flips(layout, kind, copies):
    shape = (1, 3, 6, 5) if layout == "nchw" else (1, 6, 5, 3)
    h, w = (2, 3) if layout == "nchw" else (1, 2)
    items = [{"x": np.arange(90, dtype=np.float32).reshape(shape) + 100 * i} for i in range(3)]
    data, why_not = cal.mirrored(from_iterable(items, [TensorSpec("x", shape, F32)]), kind)
    assert why_not is None
    got = [item["x"] for item in data]
    assert data.count() == 3 * copies and len(got) == 3 * copies
    for i, item in enumerate(items):
        x = item["x"]
        expected = [x, np.flip(x, w)] + ([np.flip(x, h), np.flip(np.flip(x, h), w)] if kind == "flips" else [])
        for a, b in zip(got[i * copies : (i + 1) * copies], expected):
            np.testing.assert_array_equal(a, b)
    assert kind in data.description
    assert len(list(data.limited(4))) == 4


def test_mirrored_leaves_non_images_and_none_alone():
    data = from_iterable([{"x": np.zeros((1, 16), np.float32)}], [TensorSpec("x", (1, 16), F32)])
    same, why_not = cal.mirrored(data, "hflip")
    assert same is data and "not an NCHW / NHWC float image" in why_not
    same, why_not = cal.mirrored(data, "none")
    assert same is data and why_not == "not asked for"
    with pytest.raises(UserError, match="choose one of none, hflip, flips, crops"):
        cal.mirrored(data, "rotate")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_crops_add_a_mirror_and_zoomed_crops_up_to_the_target_count(layout):
    shape = (1, 3, 20, 30) if layout == "nchw" else (1, 20, 30, 3)
    h, w = (2, 3) if layout == "nchw" else (1, 2)
    # a horizontal ramp: any crop of it, resized back, is a ramp too, within the image's values
    ramp = np.broadcast_to(np.arange(30, dtype=np.float32).reshape([30 if a == w else 1 for a in range(4)]), shape)
    items = [{"x": np.ascontiguousarray(ramp) + 100 * i} for i in range(10)]
    data, why_not = cal.mirrored(from_iterable(items, [TensorSpec("x", shape, F32)]), "crops")
    assert why_not is None
    got = [item["x"] for item in data]
    per = 2 + 5  # ceil(64 / 10) - 2 = 5 crops, after the sample and its mirror
    assert data.count() == 10 * per == len(got) and data.count() >= cal.CROPS_TARGET
    assert "5 random crops each" in data.description
    for i, item in enumerate(items):
        own = got[i * per : (i + 1) * per]
        np.testing.assert_array_equal(own[0], item["x"])
        np.testing.assert_array_equal(own[1], np.flip(item["x"], w))
        for crop in own[2:]:
            assert crop.shape == shape and crop.dtype == np.float32
            assert 100 * i - 1e-3 <= crop.min() and crop.max() <= 100 * i + 29 + 1e-3
            span = crop.max() - crop.min()
            assert 29 * 0.5 < span < 29 * 0.95  # zoomed in: a part of the ramp, stretched
            profile = np.moveaxis(crop, w, -1).reshape(-1, 30)
            assert np.allclose(profile, profile[:1], atol=1e-4)  # rows stay equal
            assert np.all(np.diff(profile[0]) > 0) or np.all(np.diff(profile[0]) < 0)  # mirrored or not
    again = [item["x"] for item in data]  # the same boxes on every pass
    for a, b in zip(got, again):
        np.testing.assert_array_equal(a, b)


def test_crops_of_a_large_set_still_add_one_crop_each():
    items = [{"x": np.ones((1, 1, 8, 8), np.float32)} for _ in range(70)]
    data, _ = cal.mirrored(from_iterable(items, [TensorSpec("x", (1, 1, 8, 8), F32)]), "crops")
    assert data.count() == 70 * 3
    assert all(np.allclose(item["x"], 1.0) for item in data)
