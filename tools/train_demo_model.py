#!/usr/bin/env python
"""Train the built-in demo model and write it, with its data, into onnxslim_cv/data/.

The demo (`onnxslim-cv demo`) needs a real model with a real accuracy to show what
compression does to it. This script trains a small residual CNN on scikit-learn's bundled
digits dataset in pure numpy, so the recipe needs no deep-learning framework, fits in one
readable file and reproduces bit-for-bit from fixed seeds.

Run from the repo root:

    python tools/train_demo_model.py

scikit-learn is needed only here; the package itself never imports it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 0
TEST_SIZE = 360  # 1797 - 360 = 1437 training samples
CALIB_SIZE = 128
INPUT_NAME = "image"
OUTPUT_NAME = "logits"

EPOCHS = 40
BATCH_SIZE = 64
PEAK_LR = 0.1
WARMUP_EPOCHS = 2
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch

OUT_DIR = Path(__file__).resolve().parent.parent / "onnxslim_cv" / "data"


# --------------------------------------------------------------------------------------
# Layer primitives. Each forward returns its output and a closure that maps the upstream
# gradient to the input gradient (adding parameter gradients to `grads` on the way), so
# the network's backward pass is just the list of closures run in reverse.
# --------------------------------------------------------------------------------------


def _conv_out(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def im2col(x: np.ndarray, kh: int, kw: int, stride: int, pad: int) -> np.ndarray:
    """[N,C,H,W] -> [N*OH*OW, C*kh*kw]; one row per output pixel, so conv becomes one GEMM."""
    n, c, h, w = x.shape
    oh, ow = _conv_out(h, kh, stride, pad), _conv_out(w, kw, stride, pad)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
    cols = np.empty((n, oh, ow, c, kh, kw), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i : i + stride * oh : stride, j : j + stride * ow : stride]
            cols[:, :, :, :, i, j] = patch.transpose(0, 2, 3, 1)
    return cols.reshape(n * oh * ow, c * kh * kw)


def col2im(dcols: np.ndarray, xshape, kh: int, kw: int, stride: int, pad: int) -> np.ndarray:
    """Adjoint of im2col: scatter-add row gradients back onto the (unpadded) input."""
    n, c, h, w = xshape
    oh, ow = _conv_out(h, kh, stride, pad), _conv_out(w, kw, stride, pad)
    dcols = dcols.reshape(n, oh, ow, c, kh, kw)
    dxp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i : i + stride * oh : stride, j : j + stride * ow : stride] += dcols[
                :, :, :, :, i, j
            ].transpose(0, 3, 1, 2)
    return dxp[:, :, pad : pad + h, pad : pad + w]


def conv2d(x, w, stride, pad, grads, name):
    """Bias-free convolution (a BN follows every conv, so a bias would be redundant)."""
    o, _, kh, kw = w.shape
    n, _, h, wd = x.shape
    oh, ow = _conv_out(h, kh, stride, pad), _conv_out(wd, kw, stride, pad)
    cols = im2col(x, kh, kw, stride, pad)
    wmat = w.reshape(o, -1)
    y = (cols @ wmat.T).reshape(n, oh, ow, o).transpose(0, 3, 1, 2)

    def backward(dy):
        d = dy.transpose(0, 2, 3, 1).reshape(-1, o)
        grads[name] += (d.T @ cols).reshape(w.shape)
        return col2im(d @ wmat, x.shape, kh, kw, stride, pad)

    return y, backward


def batchnorm(x, params, state, prefix, train, grads):
    """BatchNormalization over (N,H,W); batch stats when training, running stats otherwise."""
    gamma = params[prefix + ".weight"].reshape(1, -1, 1, 1)
    beta = params[prefix + ".bias"].reshape(1, -1, 1, 1)
    if not train:
        mean = state[prefix + ".running_mean"].reshape(1, -1, 1, 1)
        var = state[prefix + ".running_var"].reshape(1, -1, 1, 1)
        return (x - mean) / np.sqrt(var + BN_EPS) * gamma + beta, None

    m = x.shape[0] * x.shape[2] * x.shape[3]
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)  # biased: what normalises the batch
    inv_std = 1.0 / np.sqrt(var + BN_EPS)
    xhat = (x - mean) * inv_std
    rm, rv = state[prefix + ".running_mean"], state[prefix + ".running_var"]
    rm *= 1 - BN_MOMENTUM
    rm += BN_MOMENTUM * mean.ravel().astype(rm.dtype)
    rv *= 1 - BN_MOMENTUM
    rv += BN_MOMENTUM * (var.ravel() * m / (m - 1)).astype(rv.dtype)  # unbiased, as PyTorch

    def backward(dy):
        grads[prefix + ".weight"] += (dy * xhat).sum(axis=(0, 2, 3))
        grads[prefix + ".bias"] += dy.sum(axis=(0, 2, 3))
        dxhat = dy * gamma
        return inv_std * (
            dxhat
            - dxhat.mean(axis=(0, 2, 3), keepdims=True)
            - xhat * (dxhat * xhat).mean(axis=(0, 2, 3), keepdims=True)
        )

    return xhat * gamma + beta, backward


def relu(x):
    mask = x > 0
    return x * mask, lambda dy: dy * mask


# --------------------------------------------------------------------------------------
# The network. Parameter names follow PyTorch so the ONNX initializers read familiarly.
# --------------------------------------------------------------------------------------

# (conv name, bn name, in ch, out ch, kernel, stride, pad)
CONVS = [
    ("conv1", "bn1", 1, 16, 3, 1, 1),
    ("conv2", "bn2", 16, 32, 3, 2, 1),
    ("layer1.conv1", "layer1.bn1", 32, 32, 3, 1, 1),
    ("layer1.conv2", "layer1.bn2", 32, 32, 3, 1, 1),
    ("conv3", "bn3", 32, 64, 1, 1, 0),
]
NUM_CLASSES = 10
FC_IN = 64
CONV_GEOM = {c[0]: (c[5], c[6]) for c in CONVS}  # name -> (stride, pad)


def init_params(rng: np.random.Generator):
    """Kaiming-normal convs, unit/zero BN, PyTorch-default uniform linear layer."""
    params, state = {}, {}
    for conv, bn, cin, cout, k, _, _ in CONVS:
        fan_in = cin * k * k
        params[conv + ".weight"] = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        params[bn + ".weight"] = np.ones(cout, np.float32)
        params[bn + ".bias"] = np.zeros(cout, np.float32)
        state[bn + ".running_mean"] = np.zeros(cout, np.float32)
        state[bn + ".running_var"] = np.ones(cout, np.float32)
    bound = 1.0 / np.sqrt(FC_IN)
    params["fc.weight"] = rng.uniform(-bound, bound, (NUM_CLASSES, FC_IN)).astype(np.float32)
    params["fc.bias"] = rng.uniform(-bound, bound, NUM_CLASSES).astype(np.float32)
    return params, state


def forward(params, state, x, train, grads=None):
    """Logits for x; with train=True also returns the backward closure tape."""
    tape = []

    def push(out_and_bwd):
        out, bwd = out_and_bwd
        if bwd is not None:
            tape.append(bwd)
        return out

    def conv_bn(h, conv, bn):
        stride, pad = CONV_GEOM[conv]
        h = push(conv2d(h, params[conv + ".weight"], stride, pad, grads, conv + ".weight"))
        return push(batchnorm(h, params, state, bn, train, grads))

    h = push(relu(conv_bn(x, "conv1", "bn1")))
    h = push(relu(conv_bn(h, "conv2", "bn2")))  # 8x8 -> 4x4
    skip = h
    skip_index = len(tape)  # the first block op; the tape entry to leave the block through
    h = push(relu(conv_bn(h, "layer1.conv1", "layer1.bn1")))
    h = conv_bn(h, "layer1.conv2", "layer1.bn2")
    # Residual add: the gradient forks to both branches; the tape only follows the main
    # branch, so the skip gradient is stashed here and added back when the tape reaches skip.
    split_at = len(tape)
    h = push(relu(h + skip))
    h = push(relu(conv_bn(h, "conv3", "bn3")))
    hw = h.shape[2] * h.shape[3]
    pooled = h.mean(axis=(2, 3))  # GlobalAveragePool + Flatten
    logits = pooled @ params["fc.weight"].T + params["fc.bias"]
    if not train:
        return logits

    def head_backward(dlogits):
        grads["fc.weight"] += dlogits.T @ pooled
        grads["fc.bias"] += dlogits.sum(axis=0)
        dpooled = dlogits @ params["fc.weight"]
        return np.broadcast_to(dpooled[:, :, None, None] / hw, h.shape)

    def backward(dlogits):
        d = head_backward(dlogits)
        d_skip = None
        for i in range(len(tape) - 1, -1, -1):
            d = tape[i](d)
            if i == split_at:  # just went back through relu(h + skip)
                d_skip = d
            if i == skip_index:  # just left the block's main branch: merge the skip gradient
                d = d + d_skip
        return d

    return logits, backward


def softmax_xent(logits, labels):
    """Mean cross-entropy and its gradient w.r.t. the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = logits.shape[0]
    loss = -np.log(p[np.arange(n), labels] + 1e-12).mean()
    p[np.arange(n), labels] -= 1.0
    return loss, p / n


def loss_and_grads(params, state, x, y):
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    logits, backward = forward(params, state, x, True, grads)
    loss, dlogits = softmax_xent(logits, y)
    backward(dlogits)
    return loss, grads


def random_shift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shift each image by up to one pixel in each direction, zero-filled (light augmentation)."""
    n, _, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    dy = rng.integers(0, 3, n)
    dx = rng.integers(0, 3, n)
    out = np.empty_like(x)
    for a in range(3):
        for b in range(3):
            sel = (dy == a) & (dx == b)
            out[sel] = xp[sel, :, a : a + h, b : b + w]
    return out


def gradcheck() -> None:
    """Compare analytic gradients with central differences in float64 (run with --gradcheck)."""
    rng = np.random.default_rng(123)
    params, state = init_params(rng)
    params = {k: v.astype(np.float64) for k, v in params.items()}
    state = {k: v.astype(np.float64) for k, v in state.items()}
    x = rng.random((6, 1, 8, 8))
    y = rng.integers(0, NUM_CLASSES, 6)
    _, grads = loss_and_grads(params, state, x, y)
    worst = 0.0
    for name, p in params.items():
        flat = p.reshape(-1)
        for idx in rng.choice(flat.size, size=min(5, flat.size), replace=False):
            old = flat[idx]
            flat[idx] = old + 1e-6
            lp, _ = loss_and_grads(params, state, x, y)
            flat[idx] = old - 1e-6
            lm, _ = loss_and_grads(params, state, x, y)
            flat[idx] = old
            num = (lp - lm) / 2e-6
            ana = grads[name].reshape(-1)[idx]
            rel = abs(num - ana) / max(1e-8, abs(num) + abs(ana))
            worst = max(worst, rel)
            if rel > 1e-4:
                print(f"  {name}[{idx}]: numeric {num:.6g} analytic {ana:.6g} rel {rel:.2e}")
    print(f"gradcheck: worst relative error {worst:.2e}")
    if worst > 1e-4:
        raise SystemExit("gradcheck failed")


def train(x_train, y_train, rng):
    params, state = init_params(rng)
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    decay = {k for k in params if k.endswith(".weight") and not k.split(".")[-2].startswith("bn")}
    n = len(x_train)
    steps_per_epoch = int(np.ceil(n / BATCH_SIZE))
    total = EPOCHS * steps_per_epoch
    warmup = WARMUP_EPOCHS * steps_per_epoch
    step = 0
    for epoch in range(EPOCHS):
        order = rng.permutation(n)
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * BATCH_SIZE : (s + 1) * BATCH_SIZE]
            if len(idx) < 2:  # BN needs more than one sample
                continue
            xb = random_shift(x_train[idx], rng)
            loss, grads = loss_and_grads(params, state, xb, y_train[idx])
            losses.append(loss)
            if step < warmup:
                lr = PEAK_LR * (step + 1) / warmup
            else:
                lr = 0.5 * PEAK_LR * (1 + np.cos(np.pi * (step - warmup) / (total - warmup)))
            for k, p in params.items():
                g = grads[k]
                if k in decay:
                    g = g + WEIGHT_DECAY * p
                v = velocity[k]
                v *= MOMENTUM
                v += g
                p -= np.float32(lr) * v
            step += 1
        if epoch % 5 == 4 or epoch == EPOCHS - 1:
            print(f"epoch {epoch + 1:3d}/{EPOCHS}  loss {np.mean(losses):.4f}  lr {lr:.4f}")
    return params, state


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def build_onnx(params, state, test_accuracy: float | None = None) -> onnx.ModelProto:
    """The trained network as an opset-13 graph, BatchNormalization left unfolded on purpose."""
    nodes = []

    def conv_bn(inp, conv, bn):
        cout, _, k, _ = params[conv + ".weight"].shape
        stride, pad = CONV_GEOM[conv]
        nodes.append(
            helper.make_node(
                "Conv", [inp, conv + ".weight"], [conv + ".out"], name=conv,
                kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4,
            )
        )
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [conv + ".out", bn + ".weight", bn + ".bias", bn + ".running_mean", bn + ".running_var"],
                [bn + ".out"], name=bn, epsilon=BN_EPS,
            )
        )
        return bn + ".out"

    def relu_node(inp, name):
        nodes.append(helper.make_node("Relu", [inp], [name + ".out"], name=name))
        return name + ".out"

    h = relu_node(conv_bn(INPUT_NAME, "conv1", "bn1"), "relu1")
    h = relu_node(conv_bn(h, "conv2", "bn2"), "relu2")
    skip = h
    b = relu_node(conv_bn(h, "layer1.conv1", "layer1.bn1"), "layer1.relu1")
    b = conv_bn(b, "layer1.conv2", "layer1.bn2")
    nodes.append(helper.make_node("Add", [b, skip], ["layer1.add.out"], name="layer1.add"))
    h = relu_node("layer1.add.out", "layer1.relu2")
    h = relu_node(conv_bn(h, "conv3", "bn3"), "relu3")
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["pool.out"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool.out"], ["flatten.out"], name="flatten", axis=1))
    nodes.append(
        helper.make_node("Gemm", ["flatten.out", "fc.weight", "fc.bias"], [OUTPUT_NAME], name="fc", transB=1)
    )

    inits = []
    for conv, bn, *_ in CONVS:
        inits.append(numpy_helper.from_array(params[conv + ".weight"].astype(np.float32), conv + ".weight"))
        for key in (bn + ".weight", bn + ".bias"):
            inits.append(numpy_helper.from_array(params[key].astype(np.float32), key))
        for key in (bn + ".running_mean", bn + ".running_var"):
            inits.append(numpy_helper.from_array(state[key].astype(np.float32), key))
    for key in ("fc.weight", "fc.bias"):
        inits.append(numpy_helper.from_array(params[key].astype(np.float32), key))

    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", NUM_CLASSES])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # onnx 1.23 stamps IR 14, which onnxruntime 1.31 refuses
    model.producer_name = "onnxslim-cv tools/train_demo_model.py"
    model.doc_string = (
        "onnxslim-cv demo model: a small residual CNN classifying 8x8 handwritten digits "
        "(scikit-learn load_digits, i.e. UCI Optical Recognition of Handwritten Digits, "
        "CC BY 4.0). Input 'image' float32 [N,1,8,8] = pixel/16.0; output 'logits' [N,10]. "
        "Trained in pure numpy; BatchNormalization deliberately left unfolded."
    )
    meta = {"dataset": "sklearn.datasets.load_digits", "preprocessing": "x / 16.0", "classes": "0-9"}
    if test_accuracy is not None:
        meta["test_accuracy_fp32"] = f"{test_accuracy:.4f}"
    helper.set_model_props(model, meta)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    ap.add_argument("--gradcheck", action="store_true", help="check gradients and exit")
    args = ap.parse_args(argv)
    if args.gradcheck:
        gradcheck()
        return 0

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, stratify=y, random_state=SEED
    )
    print(f"train {len(x_train)}  test {len(x_test)}")

    rng = np.random.default_rng(SEED)
    t0 = time.perf_counter()
    params, state = train(x_train, y_train, rng)
    train_seconds = time.perf_counter() - t0
    print(f"training took {train_seconds:.1f} s")

    ref_logits = forward(
        {k: v.astype(np.float64) for k, v in params.items()},
        {k: v.astype(np.float64) for k, v in state.items()},
        x_test.astype(np.float64),
        train=False,
    )
    numpy_acc = float((ref_logits.argmax(axis=1) == y_test).mean())

    model = build_onnx(params, state)
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ort_logits = sess.run([OUTPUT_NAME], {INPUT_NAME: x_test})[0]
    max_diff = float(np.abs(ort_logits - ref_logits).max())
    assert max_diff < 1e-4, f"onnxruntime and numpy disagree: max abs diff {max_diff:.3g}"
    ort_acc = float((ort_logits.argmax(axis=1) == y_test).mean())
    print(f"numpy eval accuracy {numpy_acc:.4f}; onnxruntime max abs logit diff {max_diff:.2e}")
    print(f"onnxruntime fp32 test accuracy: {ort_acc:.4f} ({int(round(ort_acc * len(y_test)))}/{len(y_test)})")

    model = build_onnx(params, state, test_accuracy=ort_acc)
    onnx.checker.check_model(model, full_check=True)

    calib_idx = np.sort(np.random.default_rng(SEED + 1).choice(len(x_train), CALIB_SIZE, replace=False))
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out / "digits_cnn.onnx")
    np.savez_compressed(out / "digits_calib.npz", **{INPUT_NAME: np.ascontiguousarray(x_train[calib_idx])})
    np.savez_compressed(out / "digits_test.npz", **{INPUT_NAME: np.ascontiguousarray(x_test)})
    np.save(out / "digits_test_labels.npy", y_test.astype(np.int64))
    for name in ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz", "digits_test_labels.npy"):
        print(f"wrote {out / name} ({(out / name).stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
