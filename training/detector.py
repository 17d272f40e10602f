"""Train and export the reference digit detector (needs torch): python -m training.detector.

A small single-stage anchor-free detector in the YOLOv8 / YOLOX family, trained on scenes of
MNIST-5k digits (edgefleet.server.datasets.scenes). Its one ONNX output is the Ultralytics
yolov8 layout (1, 4 + 10, N): cx, cy, w, h in input pixels, then 10 sigmoid class scores,
the grid decoding inside the graph. See server/reference/DATACARD.md, "Reference detector".
"""

# Like training.train, this module imports torch (the "train" extra); nothing else does.

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from edgefleet.server.datasets import scenes
from edgefleet.server.reference.detect import (
    DET_CARD_PATH,
    DET_MODEL_PATH,
    DET_SPLIT_PATH,
    INPUT_NAME,
    INPUT_SIZE,
    MEAN,
    NUM_CLASSES,
    OUTPUT_NAME,
    STD,
    STRIDES,
    evaluate_detector,
    evaluate_video,
    model_macs,
    preprocessing,
)

SEED = 20261203
OPSET = 17
# Fresh training scenes each epoch (from the train pool only): the detector never sees one
# scene twice, so it cannot memorise backgrounds, and more epochs do not overfit.
EPOCHS = 48
SCENES_PER_EPOCH = 2000
BATCH = 32
LR = 3e-3
WEIGHT_DECAY = 5e-4
# A share of training scenes is letterboxed (content narrower or shorter than the input,
# zero bars around it), as a 4:3 camera frame reaches the model through the manifest.
LETTERBOX_SHARE = 0.3
# Positives: cells whose centre lies within CENTRE_RADIUS strides of a box's centre, on the
# levels whose size band holds the box's longer side (bands overlap, so sizes near the border
# train both levels).
CENTRE_RADIUS = 1.25
LEVEL_BANDS = ((0.0, 26.0), (18.0, 1e9))
BOX_WEIGHT = 2.5


def _conv(cin: int, cout: int, k: int = 3, s: int = 1) -> nn.Sequential:
    """conv + BN + ReLU (ReLU rather than SiLU: cheaper on CPUs and kinder to INT8)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class Head(nn.Module):  # type: ignore[misc, unused-ignore]
    """Decoupled box and class branches on one level."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.box = nn.Sequential(_conv(ch, ch), nn.Conv2d(ch, 4, 1))
        self.cls = nn.Sequential(_conv(ch, ch), nn.Conv2d(ch, NUM_CLASSES, 1))
        # Start class scores low (prior 0.01), as RetinaNet does, so the many empty cells do
        # not swamp the first steps.
        nn.init.constant_(cast(torch.Tensor, cast(nn.Conv2d, self.cls[1]).bias), -4.6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.box(x), self.cls(x)


class Detector(nn.Module):  # type: ignore[misc, unused-ignore]
    """Backbone to stride 16, a top-down fuse into stride 8, heads on both, decoding inside."""

    def __init__(self, size: int = INPUT_SIZE) -> None:
        super().__init__()
        self.stem = _conv(1, 16, s=2)
        self.block1 = _conv(16, 32, s=2)
        self.block2 = nn.Sequential(_conv(32, 48, s=2), _conv(48, 48))
        self.block3 = nn.Sequential(_conv(48, 64, s=2), _conv(64, 64))
        self.lateral = _conv(64, 48, k=1)
        self.fuse = _conv(48, 48)
        self.head8 = Head(48)
        self.head16 = Head(64)
        centres, strides = [], []
        for stride in STRIDES:
            n = size // stride
            ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            centres.append(torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5)
            strides.append(torch.full((n * n, 1), float(stride)))
        self.register_buffer("grid", torch.cat(centres))  # (N, 2) cell centres in cells
        self.register_buffer("stride", torch.cat(strides))  # (N, 1)

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes (B, N, 4) cx, cy, w, h in input pixels and class logits (B, N, C)."""
        c8 = self.block2(self.block1(self.stem(x)))
        c16 = self.block3(c8)
        p8 = self.fuse(c8 + F.interpolate(self.lateral(c16), scale_factor=2.0, mode="nearest"))
        boxes, logits = [], []
        for head, feat in ((self.head8, p8), (self.head16, c16)):
            b, c = head(feat)
            boxes.append(b.flatten(2))
            logits.append(c.flatten(2))
        box = torch.cat(boxes, 2).transpose(1, 2)
        logit = torch.cat(logits, 2).transpose(1, 2)
        # YOLOX-style: centre = (cell centre + offset) x stride, size = exp(.) x stride;
        # clamped so an untrained head cannot overflow exp.
        grid, stride = cast(torch.Tensor, self.grid), cast(torch.Tensor, self.stride)
        xy = (grid + box[..., :2]) * stride
        wh = torch.exp(box[..., 2:].clamp(-6.0, 6.0)) * stride
        return torch.cat([xy, wh], -1), logit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The exported graph: (B, 4 + C, N), the Ultralytics yolov8 layout."""
        box, logit = self.raw(x)
        return torch.cat([box, torch.sigmoid(logit)], -1).transpose(1, 2)


def _xyxy(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def _giou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and GIoU of paired xyxy boxes."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    union = area_a + area_b - inter + 1e-7
    iou = inter / union
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).prod(1)
    return iou, iou - (hull - union) / (hull + 1e-7)


def assign(
    grid: torch.Tensor, stride: torch.Tensor, gt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre sampling: (N,) index of each cell's box (-1 for background) for gt (G, 5)."""
    n = grid.shape[0]
    owner = torch.full((n,), -1, dtype=torch.long)
    if gt.shape[0] == 0:
        return owner, torch.zeros(n, dtype=torch.bool)
    centre = (gt[:, 1:3] + gt[:, 3:5]) / 2  # (G, 2)
    longer = (gt[:, 3:5] - gt[:, 1:3]).max(1).values  # (G,)
    cell = grid * stride  # (N, 2) pixels
    delta = (cell[:, None, :] - centre[None, :, :]).abs() / stride[:, :, None]  # (N, G, 2)
    near = (delta < CENTRE_RADIUS).all(-1)
    band = torch.zeros_like(near)
    for level, (lo, hi) in zip(STRIDES, LEVEL_BANDS, strict=True):
        on_level = stride[:, 0] == level
        in_band = (longer >= lo) & (longer <= hi)
        band |= on_level[:, None] & in_band[None, :]
    ok = near & band
    # A cell near two boxes takes the one whose centre is nearer.
    dist = delta.pow(2).sum(-1).masked_fill(~ok, float("inf"))
    best = dist.argmin(1)
    pos = ok.any(1)
    owner[pos] = best[pos]
    return owner, pos


def loss_fn(
    model: Detector, images: torch.Tensor, targets: list[torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Quality focal loss on IoU-aware class targets plus GIoU on the positive cells."""
    box, logit = model.raw(images)
    cls_target = torch.zeros_like(logit)
    pred_pos, gt_pos = [], []
    for i, gt in enumerate(targets):
        owner, pos = assign(cast(torch.Tensor, model.grid), cast(torch.Tensor, model.stride), gt)
        if pos.any():
            g = gt[owner[pos]]
            pred_pos.append(_xyxy(box[i][pos]))
            gt_pos.append(g[:, 1:5])
            idx = pos.nonzero()[:, 0]
            cls_target[i, idx, g[:, 0].long()] = -1.0  # placeholder, filled with IoU below
    num_pos = max(sum(p.shape[0] for p in pred_pos), 1)
    if pred_pos:
        pb, gb = torch.cat(pred_pos), torch.cat(gt_pos)
        iou, giou = _giou(pb, gb)
        box_loss = (1.0 - giou).sum() / num_pos
        mask = cls_target < 0
        # mask's order (batch, cell, class) matches the order pred_pos was built in.
        cls_target[mask] = iou.detach().clamp(min=0.05)
    else:
        box_loss = box.sum() * 0.0
        iou = torch.zeros(0)
    prob = torch.sigmoid(logit)
    bce = F.binary_cross_entropy_with_logits(logit, cls_target, reduction="none")
    cls_loss = (bce * (prob - cls_target).abs().pow(2)).sum() / num_pos
    total = cls_loss + BOX_WEIGHT * box_loss
    return total, {
        "cls": float(cls_loss.detach()),
        "box": float(box_loss.detach()),
        "iou": float(iou.detach().mean()) if iou.numel() else 0.0,
    }


def training_scenes(
    digits: NDArray[np.uint8], labels: NDArray[np.int64], count: int, seed: int
) -> tuple[NDArray[np.uint8], list[NDArray[np.float32]]]:
    """Fresh scenes from the train pool; a share letterboxed into the square input."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, INPUT_SIZE, INPUT_SIZE), dtype=np.uint8)
    targets: list[NDArray[np.float32]] = []
    for i in range(count):
        if rng.random() < LETTERBOX_SHARE:
            short = int(rng.integers(72, INPUT_SIZE))
            img, rows = scenes.compose_scene(rng, digits, labels, INPUT_SIZE, height=short)
            top = (INPUT_SIZE - short) // 2
            if rng.random() < 0.5:
                # A portrait frame: the same scene transposed reads as a narrower picture.
                img, rows = img.T.copy(), rows[:, [0, 2, 1, 4, 3]]
                images[i, :, top : top + short] = img
                rows = rows + np.array([0, top, 0, top, 0], np.float32)
            else:
                images[i, top : top + short] = img
                rows = rows + np.array([0, 0, top, 0, top], np.float32)
        else:
            images[i], rows = scenes.compose_scene(rng, digits, labels)
        targets.append(rows)
    return images, targets


def to_input(images: NDArray[np.uint8]) -> NDArray[np.float32]:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) with the manifest's scale, mean and std."""
    x = images.astype(np.float32)[:, None]
    x *= np.float32(1.0 / 255.0)
    x -= np.float32(MEAN)
    x /= np.float32(STD)
    return x


def fold_bn(model: nn.Module) -> nn.Module:
    """Fold every Conv2d followed by BatchNorm2d in a Sequential into one biased conv."""
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        layers = list(module)
        for j in range(len(layers) - 1):
            conv, bn = layers[j], layers[j + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                var = cast(torch.Tensor, bn.running_var)
                mean = cast(torch.Tensor, bn.running_mean)
                scale = bn.weight / torch.sqrt(var + bn.eps)
                fused = nn.Conv2d(
                    conv.in_channels,
                    conv.out_channels,
                    cast(tuple[int, int], conv.kernel_size),
                    cast(tuple[int, int], conv.stride),
                    cast(tuple[int, int], conv.padding),
                    bias=True,
                )
                fused.weight.data = conv.weight.data * scale[:, None, None, None]
                bias = conv.bias.data if conv.bias is not None else torch.zeros_like(bn.bias)
                cast(torch.Tensor, fused.bias).data = (bias - mean) * scale + bn.bias
                module[j] = fused
                module[j + 1] = nn.Identity()
    return model


def export(model: Detector, path: Path) -> None:
    """Export with BN folded, opset 17, a dynamic batch, and the contract's tensor names."""
    folded = fold_bn(model.eval())
    dummy = torch.zeros(1, 1, INPUT_SIZE, INPUT_SIZE)
    torch.onnx.export(
        folded,
        (dummy,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
    )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    proto.producer_name = "edgefleet training.detector"
    onnx.save(proto, str(path))


def train(epochs: int, per_epoch: int, log: bool = True) -> tuple[Detector, dict[str, Any]]:
    """Train from the seed; return the model and its training record."""
    torch.manual_seed(SEED)
    random.seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    record = scenes.load_record()
    pool_digits, pool_labels = scenes.training_pool(record.splits["train"].pool)
    model = Detector()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps = epochs * (per_epoch // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=steps, pct_start=0.1)
    start = time.monotonic()
    history = []
    for epoch in range(epochs):
        images, targets = training_scenes(pool_digits, pool_labels, per_epoch, SEED + epoch)
        x_all = torch.from_numpy(to_input(images))
        order = np.random.default_rng(SEED + 7919 * epoch).permutation(per_epoch)
        model.train()
        sums = {"cls": 0.0, "box": 0.0, "iou": 0.0}
        n = 0
        for b in range(per_epoch // BATCH):
            idx = order[b * BATCH : (b + 1) * BATCH]
            tgt = [torch.from_numpy(targets[k]) for k in idx]
            loss, parts = loss_fn(model, x_all[idx], tgt)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call, unused-ignore]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            for k in sums:
                sums[k] += parts[k]
            n += 1
        entry = {k: round(v / n, 4) for k, v in sums.items()}
        entry["epoch"] = epoch
        entry["elapsed_s"] = round(time.monotonic() - start, 1)
        history.append(entry)
        if log:
            print(json.dumps(entry), flush=True)
    return model.eval(), {
        "seconds": round(time.monotonic() - start, 1),
        "epochs": epochs,
        "scenes_per_epoch": per_epoch,
        "history": history,
    }


def measure(model_path: Path) -> dict[str, Any]:
    """COCO figures of an exported model: validation and test scenes, and the video."""
    figures: dict[str, Any] = {
        split: evaluate_detector(model_path, split) for split in ("validation", "test")
    }
    figures["video"] = evaluate_video(model_path)
    figures["protocol"] = (
        "pycocotools COCOeval bbox; agent.detect.decode (yolov8, per-class NMS IoU 0.5, "
        "score >= 0.01, at most 20 per image); onnxruntime CPU; video through the agent's "
        "letterbox Preprocessor and Letterbox.to_frame, truth in frame pixels"
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    """Train, export mnist_det.onnx and write its model card with COCO mAP figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--per-epoch", type=int, default=SCENES_PER_EPOCH)
    parser.add_argument("--out", type=Path, default=DET_MODEL_PATH)
    parser.add_argument("--card", type=Path, default=DET_CARD_PATH)
    parser.add_argument(
        "--measure-only", action="store_true", help="re-measure the card's figures, no training"
    )
    args = parser.parse_args(argv)
    if args.measure_only:
        card = json.loads(args.card.read_text(encoding="utf-8"))
        card["metrics"] = measure(args.out)
        args.card.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(card["metrics"], indent=1))
        return 0
    torch.set_num_threads(2)
    model, trained = train(args.epochs, args.per_epoch)
    export(model, args.out)
    figures = measure(args.out)
    print(json.dumps(figures, indent=1))
    card = {
        "model": args.out.name,
        "task": "detect",
        "architecture": (
            "stem conv3x3 1->16 s2; block1 conv3x3 16->32 s2; block2 conv3x3 32->48 s2, "
            "conv3x3 48->48 (stride 8); block3 conv3x3 48->64 s2, conv3x3 64->64 (stride 16); "
            "top-down: conv1x1 64->48, nearest x2, add, conv3x3 48->48; decoupled heads per "
            "level (box: conv3x3 + conv1x1 ->4; class: conv3x3 + conv1x1 ->10); ReLU; BN "
            "folded. Decoding in the graph: cx,cy = (cell centre + offset) x stride, "
            "w,h = exp(.) x stride, class scores = sigmoid."
        ),
        "input": {"name": INPUT_NAME, "shape": [1, 1, INPUT_SIZE, INPUT_SIZE]},
        "output": {
            "name": OUTPUT_NAME,
            "layout": "attributes_first (1, 4 + C, N): cx, cy, w, h (input px), C scores",
            "num_anchors": sum((INPUT_SIZE // s) ** 2 for s in STRIDES),
            "strides": list(STRIDES),
        },
        "labels": list(scenes.LABELS),
        "preprocessing": preprocessing().model_dump(mode="json"),
        "macs": model_macs(args.out),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "data": {"split_file": DET_SPLIT_PATH.name, "train": "fresh scenes per epoch"},
        "training": {
            **trained,
            "seed": SEED,
            "batch": BATCH,
            "optimizer": f"AdamW lr {LR} (one-cycle), weight decay {WEIGHT_DECAY}",
            "assignment": (
                f"centre sampling: cells within {CENTRE_RADIUS} strides of a box centre, "
                f"levels by longer side {LEVEL_BANDS}"
            ),
            "loss": f"quality focal (IoU targets) + {BOX_WEIGHT} x GIoU",
            "letterbox_share": LETTERBOX_SHARE,
            "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        },
        "metrics": figures,
    }
    args.card.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out} and {args.card}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
