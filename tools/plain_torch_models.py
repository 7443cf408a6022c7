"""Architectures for tools/sweep_exports.py written in plain torch, for machines without torchvision.

- ``yolov8n``: a YOLOv8-n style detector, re-implemented from the architecture's published
  description (Ultralytics YOLOv8, Jocher et al. 2023): Conv-BN-SiLU, C2f blocks (a channel
  ``chunk`` into bottlenecks, then Concat), SPPF, an FPN/PAN neck with nearest upsampling, and
  the anchor-free head whose box branch is decoded by a distribution-focal-loss (DFL) softmax
  over 16 bins, ending in one ``[N, 4 + classes, anchors]`` output, as detectors are exported
  for deployment. Anchors and strides are buffers for a fixed input size.

Imported by the export worker only (torch is not a dependency of this tool).
"""

import torch
import torch.nn as nn


class ConvBNAct(nn.Module):
    """Conv (no bias) -> BatchNorm -> SiLU, padding k // 2."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, channels: int, shortcut: bool):
        super().__init__()
        self.first = ConvBNAct(channels, channels, 3)
        self.second = ConvBNAct(channels, channels, 3)
        self.shortcut = shortcut

    def forward(self, x):
        y = self.second(self.first(x))
        return x + y if self.shortcut else y


class C2f(nn.Module):
    """1x1 conv, split in two halves, bottlenecks chained on the second half, all concatenated."""

    def __init__(self, c_in: int, c_out: int, depth: int, shortcut: bool):
        super().__init__()
        self.half = c_out // 2
        self.expand = ConvBNAct(c_in, 2 * self.half)
        self.merge = ConvBNAct((2 + depth) * self.half, c_out)
        self.blocks = nn.ModuleList(Bottleneck(self.half, shortcut) for _ in range(depth))

    def forward(self, x):
        parts = list(self.expand(x).chunk(2, 1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.merge(torch.cat(parts, 1))


class SPPF(nn.Module):
    """Three chained 5x5 max pools, concatenated with their input."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        hidden = c_in // 2
        self.reduce = ConvBNAct(c_in, hidden)
        self.merge = ConvBNAct(4 * hidden, c_out)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        parts = [self.reduce(x)]
        for _ in range(3):
            parts.append(self.pool(parts[-1]))
        return self.merge(torch.cat(parts, 1))


class Detect(nn.Module):
    """Per scale a box branch (4 sides x ``bins`` DFL logits) and a class branch; decoded to
    ``[N, 4 + classes, anchors]``: box centre and size in pixels, then class probabilities."""

    def __init__(self, classes: int, channels, size: int, strides=(8, 16, 32), bins: int = 16):
        super().__init__()
        self.classes, self.bins = classes, bins
        box_width = max(16, channels[0] // 4, 4 * bins)
        class_width = max(channels[0], min(classes, 100))
        self.box = nn.ModuleList(
            nn.Sequential(ConvBNAct(c, box_width, 3), ConvBNAct(box_width, box_width, 3), nn.Conv2d(box_width, 4 * bins, 1))
            for c in channels)
        self.cls = nn.ModuleList(
            nn.Sequential(ConvBNAct(c, class_width, 3), ConvBNAct(class_width, class_width, 3), nn.Conv2d(class_width, classes, 1))
            for c in channels)
        self.dfl = nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)  # the expected bin
        self.dfl.weight.data[:] = torch.arange(bins, dtype=torch.float).view(1, bins, 1, 1)
        anchors, anchor_strides = [], []
        for stride in strides:
            cells = size // stride
            ys, xs = torch.meshgrid(torch.arange(cells) + 0.5, torch.arange(cells) + 0.5, indexing="ij")
            anchors.append(torch.stack((xs, ys), -1).view(-1, 2))
            anchor_strides.append(torch.full((cells * cells, 1), float(stride)))
        self.register_buffer("anchors", torch.cat(anchors).T.unsqueeze(0))
        self.register_buffer("strides", torch.cat(anchor_strides).T.unsqueeze(0))

    def forward(self, features):
        n = features[0].shape[0]
        rows = 4 * self.bins + self.classes
        out = torch.cat([torch.cat((box(x), cls(x)), 1).view(n, rows, -1)
                         for x, box, cls in zip(features, self.box, self.cls)], 2)
        box, cls = out.split((4 * self.bins, self.classes), 1)
        count = box.shape[2]
        sides = self.dfl(box.view(n, 4, self.bins, count).transpose(2, 1).softmax(1)).view(n, 4, count)
        left_top, right_bottom = sides.chunk(2, 1)
        top_left, bottom_right = self.anchors - left_top, self.anchors + right_bottom
        boxes = torch.cat(((top_left + bottom_right) / 2, bottom_right - top_left), 1) * self.strides
        return torch.cat((boxes, cls.sigmoid()), 1)


class YOLOv8(nn.Module):
    """The n scale: widths 16-256, C2f depths 1, 2, 2, 1; ``size`` fixes the anchor grid."""

    def __init__(self, size: int = 320, classes: int = 80, w=(16, 32, 64, 128, 256), d=(1, 2, 2, 1)):
        super().__init__()
        self.stem = nn.Sequential(ConvBNAct(3, w[0], 3, 2), ConvBNAct(w[0], w[1], 3, 2), C2f(w[1], w[1], d[0], True))
        self.p3 = nn.Sequential(ConvBNAct(w[1], w[2], 3, 2), C2f(w[2], w[2], d[1], True))
        self.p4 = nn.Sequential(ConvBNAct(w[2], w[3], 3, 2), C2f(w[3], w[3], d[2], True))
        self.p5 = nn.Sequential(ConvBNAct(w[3], w[4], 3, 2), C2f(w[4], w[4], d[3], True), SPPF(w[4], w[4]))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top_down4 = C2f(w[4] + w[3], w[3], 1, False)
        self.top_down3 = C2f(w[3] + w[2], w[2], 1, False)
        self.down3 = ConvBNAct(w[2], w[2], 3, 2)
        self.bottom_up4 = C2f(w[2] + w[3], w[3], 1, False)
        self.down4 = ConvBNAct(w[3], w[3], 3, 2)
        self.bottom_up5 = C2f(w[3] + w[4], w[4], 1, False)
        self.detect = Detect(classes, (w[2], w[3], w[4]), size)

    def forward(self, x):
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        n4 = self.top_down4(torch.cat((self.up(p5), p4), 1))
        n3 = self.top_down3(torch.cat((self.up(n4), p3), 1))
        m4 = self.bottom_up4(torch.cat((self.down3(n3), n4), 1))
        m5 = self.bottom_up5(torch.cat((self.down4(m4), p5), 1))
        return self.detect([n3, m4, m5])


def yolov8n(size: int = 320) -> nn.Module:
    return YOLOv8(size=size)
