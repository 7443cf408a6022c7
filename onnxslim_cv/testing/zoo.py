"""Registry of the real pretrained models in the shared folder (``../shared/models``).

The folder and its ``MODELS.md`` are maintained outside this repo and must never be copied
into it; everything here reads it in place and degrades to "nothing available" when it is
absent, so tests skip and tools say so instead of failing.

Each :class:`SharedModel` knows its file, a fixed input shape (for the dynamic PP-OCR and
super-resolution models), the preprocessing that reproduces MODELS.md's numbers, and where its
data comes from:

* :meth:`SharedModel.labelled` yields ``(input_dict, label)`` for the labelled models
  (ImageNet, CIFAR-10, MNIST, and the PP-OCR text-orientation crops);
* :meth:`SharedModel.inputs` yields evaluation inputs for every model;
* :meth:`SharedModel.calibration` returns a :class:`~onnxslim_cv.calibration.CalibrationData`.

Evaluation and calibration stay disjoint where the data allows: both walk the same ordered
pool of samples, evaluation from the front and calibration from the back (``offset`` skips
samples at the back). So ``labelled(limit=N)`` and ``calibration(limit=M, offset=K)`` share no
sample as long as ``N + M + K <= pool size``. Full-set evaluation (the MODELS.md numbers) of
course overlaps with any calibration subset of the same pool (ImageNet has only 500 images).
The PP-OCR classifier is the exception: it is evaluated on the 12 text-line crops of
``sample.jpg`` and calibrated on COCO images, so its two sets never overlap.

Pool orders: ImageNet is a fixed permutation (seed 0) of ``labels.csv`` so that a prefix spans
all classes; CIFAR-10 is round-robin over the classes (airplane/0000, automobile/0000, ...);
MNIST keeps the test-set order; image folders are sorted by file name.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

from ..calibration import CalibrationData, ImagePreprocess
from ..specs import TensorSpec

ENV_VAR = "ONNXSLIM_CV_SHARED_MODELS"
TASKS = ("classification", "detection", "segmentation", "super-resolution")

Item = dict  # {input_name: float32 array [1, C, H, W]}


def shared_models_dir() -> Optional[Path]:
    """The shared models folder, or None when it is absent.

    ``$ONNXSLIM_CV_SHARED_MODELS`` wins when set (a missing folder then means None, never a
    fallback, so tests can force the absent case); otherwise ``<repo root>/../shared/models``.
    """
    configured = os.environ.get(ENV_VAR)
    if configured:
        path = Path(configured).expanduser()
        return path.resolve() if path.is_dir() else None
    repo_root = Path(__file__).resolve().parent.parent.parent
    default = (repo_root.parent / "shared" / "models").resolve()
    return default if default.is_dir() else None


def _require_dir() -> Path:
    root = shared_models_dir()
    if root is None:
        raise FileNotFoundError(
            f"the shared models folder is absent (set ${ENV_VAR} or place it at <repo>/../shared/models)"
        )
    return root


# --------------------------------------------------------------------------------------------
# Preprocessing (each returns one sample [1, C, H, W] float32 from a PIL image)
# --------------------------------------------------------------------------------------------


def open_rgb(path):
    """An image file as a decoded RGB PIL image (the file is closed again)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def _hwc_to_batch(pixels: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None], dtype=np.float32)


def imagenet_caffe_preprocess(image) -> np.ndarray:
    """SqueezeNet (Caffe2): shorter side 256 bilinear, center crop 224, BGR, minus (104,117,123).

    Written out because MODELS.md rounds the long side (``round(long*256/short)``) where
    ``ImagePreprocess`` truncates; the two differ by one pixel on some images.
    """
    from PIL import Image

    image = image.convert("RGB")
    width, height = image.size
    if width <= height:
        new_w, new_h = 256, round(height * 256 / width)
    else:
        new_w, new_h = round(width * 256 / height), 256
    pixels = np.asarray(image.resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.float32)
    left, top = round((new_w - 224) / 2), round((new_h - 224) / 2)
    pixels = pixels[top : top + 224, left : left + 224, ::-1] - np.array([104, 117, 123], np.float32)
    return _hwc_to_batch(pixels)


PPOCR_CLS_HEIGHT, PPOCR_CLS_WIDTH = 48, 192


def ppocr_cls_preprocess(image) -> np.ndarray:
    """PaddleOCR ClsResizeImg: BGR, height 48 keeping the aspect (width = ceil, at most 192),
    ``(x/255 - 0.5)/0.5``, right-padded with zeros to 192. PIL bilinear stands in for cv2's."""
    from PIL import Image

    image = image.convert("RGB")
    width, height = image.size
    resized_w = min(PPOCR_CLS_WIDTH, math.ceil(PPOCR_CLS_HEIGHT * width / height))
    pixels = np.asarray(image.resize((resized_w, PPOCR_CLS_HEIGHT), Image.Resampling.BILINEAR), np.float32)
    pixels = (pixels[..., ::-1] / 255.0 - 0.5) / 0.5
    canvas = np.zeros((PPOCR_CLS_HEIGHT, PPOCR_CLS_WIDTH, 3), np.float32)
    canvas[:, :resized_w] = pixels
    return _hwc_to_batch(canvas)


SUPERRES_SCALE, SUPERRES_SIZE = 3, 224


def superres_crop(image):
    """The high-resolution target: a center 672x672 crop (or the largest centred square when
    the image is smaller), as in MODELS.md's PSNR measurement."""
    image = image.convert("RGB")
    width, height = image.size
    side = min(SUPERRES_SCALE * SUPERRES_SIZE, width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def superres_preprocess(image) -> np.ndarray:
    """Y channel (YCbCr) in [0, 1] of the centre crop, bicubic-downsampled (as Y) to 224x224.

    For images of at least 672 px this is exactly the x1/3 downsample the PSNR of MODELS.md
    uses; smaller images give a square crop resized to 224.
    """
    from PIL import Image

    luma = superres_crop(image).convert("YCbCr").getchannel("Y")
    low = luma.resize((SUPERRES_SIZE, SUPERRES_SIZE), Image.Resampling.BICUBIC)
    return _hwc_to_batch(np.asarray(low, dtype=np.float32)[..., None] / 255.0)


def _with(preprocess: ImagePreprocess, channels: int, size: Tuple[int, int]) -> Callable:
    """Preprocessing that ``ImagePreprocess`` expresses exactly (a plain stretch)."""
    spec = TensorSpec("x", (1, channels, size[0], size[1]), np.dtype(np.float32))

    def apply(image) -> np.ndarray:
        return preprocess.apply(image, spec)[None]

    return apply


# --------------------------------------------------------------------------------------------
# Sample pools
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sample:
    """One sample of a pool: ``load()`` gives the model input [1, C, H, W]."""

    name: str
    load: Callable[[], np.ndarray]
    label: Optional[int] = None


def _from_file(path: Path, preprocess: Callable) -> Callable[[], np.ndarray]:
    return lambda: preprocess(open_rgb(path))


def _read_csv(path: Path) -> List[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _imagenet_rows(root: Path) -> List[dict]:
    """labels.csv rows in a fixed permutation (seed 0): any prefix spans the whole label range."""
    rows = _read_csv(root / "imagenet" / "labels.csv")
    order = np.random.default_rng(0).permutation(len(rows))
    return [rows[i] for i in order]


def _cifar_rows(root: Path) -> List[dict]:
    """Round-robin over classes, so the first N images are class-balanced."""
    rows = _read_csv(root / "cifar10" / "labels.csv")
    return sorted(rows, key=lambda r: (Path(r["file"]).stem, int(r["class_index"])))


@functools.lru_cache(maxsize=2)
def _mnist_arrays(path: str) -> Tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["images"], data["labels"]


def _sorted_images(folder: Path) -> List[Path]:
    """Image files by name (plain string order, as MODELS.md lists the face counts: 1, 10, 11, ...)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def _coco_images(root: Path) -> List[Path]:
    return _sorted_images(root / "detection" / "images" / "coco")


# --------------------------------------------------------------------------------------------
# PP-OCR text-orientation crops: the detector's text lines of sample.jpg, upright and rotated
# --------------------------------------------------------------------------------------------

PPOCR_DET_THRESHOLD = 0.3
PPOCR_MIN_REGION_PIXELS = 30


def ppocr_det_native_size(width: int, height: int, limit: int = 960) -> Tuple[int, int]:
    """PaddleOCR DetResizeForTest: longer side at most ``limit``, both sides rounded to 32."""
    ratio = min(1.0, limit / max(width, height))
    return (max(32, int(round(height * ratio / 32)) * 32), max(32, int(round(width * ratio / 32)) * 32))


def ppocr_det_preprocess_native(image) -> np.ndarray:
    """PP-OCR det at its own resolution (MODELS.md: sample.jpg -> 544x800)."""
    size = ppocr_det_native_size(*image.size)
    return _with(dataclasses.replace(PPOCR_DET_PREPROCESS, size=size), 3, size)(image)


def text_regions(probability: np.ndarray, threshold: float = PPOCR_DET_THRESHOLD,
                 min_pixels: int = PPOCR_MIN_REGION_PIXELS) -> List[Tuple[int, int, int, int]]:
    """Bounding boxes (y0, x0, y1, x1) of 4-connected regions above ``threshold`` with at least
    ``min_pixels`` pixels, in raster order of their first pixel (scipy-free on purpose)."""
    mask = np.asarray(probability) > threshold
    seen = np.zeros_like(mask)
    height, width = mask.shape
    boxes = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue = deque([(y, x)])
        count, y0, x0, y1, x1 = 0, y, x, y, x
        while queue:
            cy, cx = queue.popleft()
            count += 1
            y0, x0, y1, x1 = min(y0, cy), min(x0, cx), max(y1, cy), max(x1, cx)
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if count >= min_pixels:
            boxes.append((int(y0), int(x0), int(y1) + 1, int(x1) + 1))
    return boxes


@functools.lru_cache(maxsize=2)
def _ppocr_text_crops(root: str) -> Tuple:
    """Horizontal text lines of sample.jpg found by the fp32 detector, padded by half their
    height on each side (this reproduces the cls test vector closely, not bit-exactly: the
    original used PaddleOCR's rotated-box warp)."""
    from .. import runtime

    root_path = Path(root)
    image = open_rgb(root_path / "ocr" / "images" / "sample.jpg")
    session = runtime.make_session(str(root_path / ZOO["ppocr_det"].path))
    feed = ppocr_det_preprocess_native(image)
    probability = runtime.run(session, {ZOO["ppocr_det"].input_name: feed})[0][0, 0]
    scale_y, scale_x = image.size[1] / probability.shape[0], image.size[0] / probability.shape[1]
    crops = []
    for y0, x0, y1, x1 in text_regions(probability):
        if x1 - x0 <= y1 - y0:
            continue  # the classifier is for horizontal lines
        pad = (y1 - y0) / 2
        box = (
            max(0, round((x0 - pad) * scale_x)),
            max(0, round((y0 - pad) * scale_y)),
            min(image.size[0], round((x1 + pad) * scale_x)),
            min(image.size[1], round((y1 + pad) * scale_y)),
        )
        crops.append(image.crop(box))
    return tuple(crops)


def _ppocr_cls_pool(root: Path) -> List[_Sample]:
    from PIL import Image

    samples = []
    for index, crop in enumerate(_ppocr_text_crops(str(root))):
        samples.append(_Sample(f"sample.jpg line {index} 0deg", lambda c=crop: ppocr_cls_preprocess(c), 0))
        rotated = crop.transpose(Image.Transpose.ROTATE_180)
        samples.append(_Sample(f"sample.jpg line {index} 180deg", lambda c=rotated: ppocr_cls_preprocess(c), 1))
    return samples


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SharedModel:
    """One shared model: file, fixed input shape, preprocessing and data.

    ``preprocess`` is the :class:`ImagePreprocess` to use with ``--calib`` on the CLI; it is
    exact for the stretch-resized models (ResNet-20, ultraface, FastestDet, PP-OCR det) and
    the nearest equivalent otherwise (see ``preprocess_exact``). ``load_image`` is the exact
    preprocessing this module uses everywhere.
    """

    key: str
    path: str
    task: str
    input_name: str
    input_shape: Tuple[int, ...]
    dynamic: bool
    preprocess: Optional[ImagePreprocess]
    preprocess_exact: bool
    data: str
    """Where evaluation inputs come from, in words."""
    calibration_data: str
    expected: str
    """MODELS.md's measured fp32 result."""
    load_image: Callable = field(repr=False, compare=False)
    pool: Callable[[Path], List[_Sample]] = field(repr=False, compare=False)
    calibration_pool: Optional[Callable[[Path], List[_Sample]]] = field(default=None, repr=False, compare=False)
    """A separate calibration pool (read from the front); None: the evaluation pool from the back."""
    test_data_sets: Tuple[str, ...] = ()
    """``<model>_test_data_set_*`` folders whose input is a preprocessed real image, with the
    image (relative to the shared dir) or "" when it is not documented."""
    labels_known: bool = False

    # -- files -------------------------------------------------------------------------------

    def model_path(self) -> Path:
        return _require_dir() / self.path

    @property
    def input_shapes(self) -> dict:
        """``{input_name: input_shape}``, as ``load_model(..., input_shapes=)`` and ``benchmark`` take it."""
        return {self.input_name: tuple(self.input_shape)}

    def specs(self) -> List[TensorSpec]:
        return [TensorSpec(self.input_name, tuple(self.input_shape), np.dtype(np.float32))]

    @property
    def is_labelled(self) -> bool:
        return self.labels_known

    # -- data --------------------------------------------------------------------------------

    def _pool(self) -> List[_Sample]:
        return _cached_pool(self.key, str(_require_dir()), "evaluation")

    def _calibration_samples(self) -> List[_Sample]:
        if self.calibration_pool is not None:
            return _cached_pool(self.key, str(_require_dir()), "calibration")
        return list(reversed(self._pool()))

    def preprocess_file(self, path) -> np.ndarray:
        """One image file -> model input [1, C, H, W] with this model's preprocessing."""
        return self.load_image(open_rgb(Path(path)))

    def labelled(self, limit: Optional[int] = None) -> Iterator[Tuple[Item, int]]:
        """``(input_dict, label)`` pairs from the front of the pool; empty for unlabelled models."""
        if not self.labels_known:
            return iter(())
        samples = self._pool()[: limit if limit is not None else None]
        return ((self._feed(s.load()), s.label) for s in samples)

    def inputs(self, limit: Optional[int] = None, *, offset: int = 0) -> Iterator[Item]:
        """Evaluation inputs from the front of the pool (every model has some)."""
        samples = self._pool()[offset:]
        if limit is not None:
            samples = samples[:limit]
        return (self._feed(s.load()) for s in samples)

    def sample_names(self, limit: Optional[int] = None) -> List[str]:
        return [s.name for s in self._pool()[: limit if limit is not None else None]]

    def calibration_sample_names(self, limit: Optional[int] = None, *, offset: int = 0) -> List[str]:
        """Names of the samples :meth:`calibration` reads, in order (to show or check disjointness)."""
        samples = self._calibration_samples()[offset:]
        return [s.name for s in (samples[:limit] if limit is not None else samples)]

    def calibration(self, limit: Optional[int] = None, *, offset: int = 0) -> CalibrationData:
        """Real images of the model's domain, read lazily, one sample [1, C, H, W] per item.

        Taken from the back of the evaluation pool (skipping ``offset``), so it is disjoint from
        a ``labelled(N)`` prefix while ``N + limit + offset`` fits the pool; the PP-OCR
        classifier uses COCO images instead.
        """
        samples = self._calibration_samples()[offset:]
        if limit is not None:
            samples = samples[:limit]
        specs = self.specs()

        def open_items():
            for sample in samples:
                yield f"{self.key} calibration sample {sample.name}", self._feed(sample.load())

        where = "a separate pool" if self.calibration_pool is not None else "the back of the evaluation pool"
        description = f"{self.key}: {len(samples)} {self.calibration_data} (from {where}, offset {offset})"
        return CalibrationData(specs, open_items, description=description, total=len(samples))

    def _feed(self, array: np.ndarray) -> Item:
        return {self.input_name: array}


@functools.lru_cache(maxsize=64)
def _cached_pool(key: str, root: str, which: str) -> List[_Sample]:
    """Pools are listed once per process (the superres pool reads 500 image headers)."""
    entry = ZOO[key]
    build = entry.calibration_pool if which == "calibration" else entry.pool
    return build(Path(root))


def _imagenet_pool(preprocess: Callable) -> Callable[[Path], List[_Sample]]:
    def pool(root: Path) -> List[_Sample]:
        return [
            _Sample(Path(r["file"]).name, _from_file(root / "imagenet" / r["file"], preprocess), int(r["class_index"]))
            for r in _imagenet_rows(root)
        ]

    return pool


def _cifar_pool(root: Path) -> List[_Sample]:
    preprocess = ZOO["resnet20"].load_image
    return [
        _Sample(r["file"], _from_file(root / "cifar10" / r["file"], preprocess), int(r["class_index"]))
        for r in _cifar_rows(root)
    ]


def _mnist_pool(root: Path) -> List[_Sample]:
    images, labels = _mnist_arrays(str(root / "mnist" / "mnist_t10k_0000-4999.npz"))
    return [
        _Sample(f"mnist test {i}", lambda i=i: (images[i].astype(np.float32) / 255.0)[None, None], int(labels[i]))
        for i in range(len(labels))
    ]


def _folder_pool(files: Callable[[Path], List[Path]], key: str) -> Callable[[Path], List[_Sample]]:
    def pool(root: Path) -> List[_Sample]:
        preprocess = ZOO[key].load_image
        return [_Sample(p.name, _from_file(p, preprocess)) for p in files(root)]

    return pool


def _ppocr_det_files(root: Path) -> List[Path]:
    """sample.jpg first (the only document; evaluation prefixes see text), then COCO."""
    return [root / "ocr" / "images" / "sample.jpg"] + _coco_images(root)


def _superres_files(root: Path) -> List[Path]:
    """ImageNet images of at least 672 px first (the PSNR set), then the rest, both in pool order."""
    from PIL import Image

    files = [root / "imagenet" / r["file"] for r in _imagenet_rows(root)]
    big = []
    for path in files:
        with Image.open(path) as image:
            big.append(min(image.size) >= SUPERRES_SCALE * SUPERRES_SIZE)
    return [p for p, b in zip(files, big) if b] + [p for p, b in zip(files, big) if not b]


def superres_psnr_files(limit: Optional[int] = None) -> List[Path]:
    """The ImageNet images MODELS.md measures super-resolution PSNR on (shorter side >= 672)."""
    from PIL import Image

    root = _require_dir()
    files = sorted((root / "imagenet" / "images").glob("*.JPEG"))
    chosen = []
    for path in files:
        with Image.open(path) as image:
            if min(image.size) >= SUPERRES_SCALE * SUPERRES_SIZE:
                chosen.append(path)
    return chosen[:limit] if limit is not None else chosen


PPOCR_DET_PREPROCESS = ImagePreprocess(
    size=(224, 320), bgr=True, scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)
_RESNET20_PREPROCESS = ImagePreprocess(
    size=(32, 32), scale=1 / 255, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010)
)
_ULTRAFACE_PREPROCESS = ImagePreprocess(size=(240, 320), mean=(127.0,), std=(128.0,))
_FASTESTDET_PREPROCESS = ImagePreprocess(size=(352, 352), bgr=True, scale=1 / 255)


ZOO: dict = {
    entry.key: entry
    for entry in (
        SharedModel(
            key="squeezenet",
            path="imagenet/squeezenet1.1_caffe2_fp32.onnx",
            task="classification",
            input_name="data_0",
            input_shape=(1, 3, 224, 224),
            dynamic=False,
            preprocess=ImagePreprocess(size=(224, 224), resize_mode="center-crop", bgr=True, mean=(104, 117, 123)),
            preprocess_exact=False,  # ImagePreprocess truncates the long side, MODELS.md rounds it
            data="500 ImageNet sample images (labels.csv)",
            calibration_data="ImageNet images",
            expected="top-1 59.8% / top-5 82.4% on 500",
            load_image=imagenet_caffe_preprocess,
            pool=_imagenet_pool(imagenet_caffe_preprocess),
            test_data_sets=("imagenet/squeezenet1.1_caffe2_fp32_test_data_set_1:imagenet/images/n01440764_tench.JPEG",),
            labels_known=True,
        ),
        SharedModel(
            key="resnet20",
            path="cifar10/resnet20_cifar10.onnx",
            task="classification",
            input_name="input",
            input_shape=(1, 3, 32, 32),
            dynamic=False,
            preprocess=_RESNET20_PREPROCESS,
            preprocess_exact=True,
            data="2,500 CIFAR-10 test JPEGs (labels.csv)",
            calibration_data="CIFAR-10 test images",
            expected="top-1 80.96% on 2,500",
            load_image=_with(_RESNET20_PREPROCESS, 3, (32, 32)),
            pool=_cifar_pool,
            test_data_sets=("cifar10/resnet20_cifar10_test_data_set_0:cifar10/images/airplane/0000.jpg",),
            labels_known=True,
        ),
        SharedModel(
            key="mnist",
            path="mnist/mnist-8.onnx",
            task="classification",
            input_name="Input3",
            input_shape=(1, 1, 28, 28),
            dynamic=False,
            preprocess=ImagePreprocess(size=(28, 28), scale=1 / 255),
            preprocess_exact=True,  # for image files; the zoo reads the npz directly
            data="5,000 MNIST test digits (npz)",
            calibration_data="MNIST test digits",
            expected="top-1 98.34% on 5,000",
            load_image=_with(ImagePreprocess(size=(28, 28), scale=1 / 255), 1, (28, 28)),
            pool=_mnist_pool,
            test_data_sets=("mnist/mnist-8_test_data_set_0:mnist test 0",),
            labels_known=True,
        ),
        SharedModel(
            key="ppocr_det",
            path="ocr/ch_PP-OCRv3_det_infer.onnx",
            task="segmentation",
            input_name="x",
            input_shape=(1, 3, 224, 320),
            dynamic=True,
            preprocess=PPOCR_DET_PREPROCESS,
            preprocess_exact=True,  # at the fixed 224x320 stretch (PaddleOCR keeps the aspect)
            data="sample.jpg + 20 COCO images, stretched to 224x320",
            calibration_data="COCO images (+ sample.jpg)",
            expected="sample.jpg @544x800: mean prob 0.040, 4.0% > 0.3, 6 regions",
            load_image=_with(PPOCR_DET_PREPROCESS, 3, (224, 320)),
            pool=_folder_pool(_ppocr_det_files, "ppocr_det"),
            test_data_sets=("ocr/ch_PP-OCRv3_det_infer_test_data_set_0:ocr/images/sample.jpg",),
        ),
        SharedModel(
            key="ppocr_cls",
            path="ocr/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            task="classification",
            input_name="x",
            input_shape=(1, 3, 48, 192),
            dynamic=True,
            preprocess=ImagePreprocess(
                size=(48, 192), resize_mode="letterbox", bgr=True, scale=1 / 255, mean=(0.5,), std=(0.5,),
                pad_value=127.5,
            ),
            preprocess_exact=False,  # letterbox shrinks lines wider than 4:1 instead of stretching them
            data="12 text-line crops of sample.jpg (6 lines x 0/180 deg)",
            calibration_data="COCO images",
            expected="12/12 correct 0/180 decisions",
            load_image=ppocr_cls_preprocess,
            pool=_ppocr_cls_pool,
            calibration_pool=_folder_pool(_coco_images, "ppocr_cls"),
            test_data_sets=("ocr/ch_ppocr_mobile_v2.0_cls_infer_test_data_set_0:sample.jpg line 0 0deg",),
            labels_known=True,
        ),
        SharedModel(
            key="ultraface",
            path="detection/ultraface_version-RFB-320.onnx",
            task="detection",
            input_name="input",
            input_shape=(1, 3, 240, 320),
            dynamic=False,
            preprocess=_ULTRAFACE_PREPROCESS,
            preprocess_exact=True,
            data="24 face photos",
            calibration_data="face photos",
            expected="600 faces on 24 images (44, 19, 25, ... per image)",
            load_image=_with(_ULTRAFACE_PREPROCESS, 3, (240, 320)),
            pool=_folder_pool(lambda root: _sorted_images(root / "detection" / "images" / "faces"), "ultraface"),
            test_data_sets=("detection/ultraface_version-RFB-320_test_data_set_0:detection/images/faces/1.jpg",),
        ),
        SharedModel(
            key="fastestdet",
            path="detection/fastestdet.onnx",
            task="detection",
            input_name="input",
            input_shape=(1, 3, 352, 352),
            dynamic=False,
            preprocess=_FASTESTDET_PREPROCESS,
            preprocess_exact=True,
            data="20 COCO val2017 images",
            calibration_data="COCO images",
            expected="2.75 detections per image",
            load_image=_with(_FASTESTDET_PREPROCESS, 3, (352, 352)),
            pool=_folder_pool(_coco_images, "fastestdet"),
            test_data_sets=("detection/fastestdet_test_data_set_0:detection/images/coco/000000000139.jpg",),
        ),
        SharedModel(
            key="superres",
            path="superres/pytorch_super_resolution.onnx",
            task="super-resolution",
            input_name="input",
            input_shape=(1, 1, 224, 224),
            dynamic=True,
            preprocess=ImagePreprocess(size=(224, 224), resize_mode="center-crop", crop_ratio=1.0, scale=1 / 255),
            preprocess_exact=False,  # PIL "L" vs YCbCr Y, bilinear vs bicubic, no 672 crop
            data="ImageNet images, Y channel of the centre 672 crop downsampled x3 (10 of them >= 672 px first)",
            calibration_data="ImageNet images (Y channel)",
            expected="PSNR 28.71 dB (bicubic 28.44 dB) on 10 ImageNet 672 crops",
            load_image=superres_preprocess,
            pool=_folder_pool(_superres_files, "superres"),
            test_data_sets=("superres/pytorch_super_resolution_test_data_set_0:imagenet/images/n01924916_flatworm.JPEG",),
        ),
    )
}


def get(key: str) -> SharedModel:
    """The registry entry for ``key``; KeyError names the known keys."""
    try:
        return ZOO[key]
    except KeyError:
        raise KeyError(f"unknown shared model '{key}'; known: {', '.join(ZOO)}") from None


def available() -> List[SharedModel]:
    """Entries whose model file is present (empty when the shared folder is absent)."""
    root = shared_models_dir()
    if root is None:
        return []
    return [entry for entry in ZOO.values() if (root / entry.path).is_file()]


def find_by_path(path) -> Optional[SharedModel]:
    """The entry whose file is ``path`` (so tools can default ``--zoo``), else None."""
    root = shared_models_dir()
    if root is None:
        return None
    target = Path(path).resolve()
    for entry in ZOO.values():
        if (root / entry.path).resolve() == target:
            return entry
    return None


def read_tensor(path) -> np.ndarray:
    """A serialized TensorProto (``input_0.pb`` of a test data set) as an array."""
    import onnx
    from onnx import numpy_helper

    tensor = onnx.TensorProto()
    tensor.ParseFromString(Path(path).read_bytes())
    return numpy_helper.to_array(tensor)


def reference_test_set(entry: SharedModel, index: int = 0) -> Tuple[Path, str]:
    """(folder, source) of the ``index``-th documented test data set of ``entry``: ``source`` is
    an image path relative to the shared dir, or a pool sample name."""
    folder, source = entry.test_data_sets[index].split(":", 1)
    return _require_dir() / folder, source

