"""Time Mask R-CNN with a ViG backbone at detection resolution (needs only torch, torchvision, timm).

    python -m vig.dense.bench_maskrcnn --model vig_tiny --size 1333 800 [--batch 2] [--dtype bf16]

Random images of exactly `--size W H` (Mask R-CNN keeps 1333x800: short side 800, long side <= 1333)
with a few random boxes / masks each. Reports, as one JSON line: inference latency (eval, no_grad)
and training-step time (forward + backward + AdamW step), images/s, peak GPU memory. Timing uses
CUDA events after warm-up iterations (the first Triton compile can take minutes); on CPU, wall time.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from vig.dense.detection import MaskRCNNConfig, build_maskrcnn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COCO_NUM_CLASSES = 91  # COCO category ids 1..90 + background


def random_targets(batch: int, width: int, height: int, num_classes: int, objects: int, device) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        xy = torch.rand(objects, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
        wh = (0.05 + 0.25 * torch.rand(objects, 2, generator=generator)) * torch.tensor([width, height])
        boxes = torch.cat([xy, xy + wh], dim=1)
        masks = torch.zeros(objects, height, width, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.long().tolist()):
            mask[y1:y2, x1:x2] = 1
        labels = torch.randint(1, num_classes, (objects,), generator=generator)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device), "masks": masks.to(device)})
    return targets


def time_call(fn: Callable[[], object], warmup: int, iters: int, device: torch.device) -> float:
    """Mean seconds per call after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000 / iters
    begin = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - begin) / iters


def benchmark(
    model_name: str, width: int, height: int, batch: int, dtype: str, warmup: int, iters: int, train: bool
) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = MaskRCNNConfig(min_size=min(width, height), max_size=max(width, height))
    model = build_maskrcnn(model_name, {}, COCO_NUM_CLASSES, config).to(device)
    images = [torch.rand(3, height, width, device=device) for _ in range(batch)]
    autocast = torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")
    result = {
        "model": model_name, "size": [width, height], "batch": batch, "dtype": dtype, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "warmup": warmup, "iters": iters, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
    }  # fmt: skip

    def infer() -> None:
        with torch.no_grad(), autocast:
            model(images)

    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_call(infer, warmup, iters, device)
    result["infer_s_per_batch"] = seconds
    result["infer_images_per_s"] = batch / seconds
    if device.type == "cuda":
        result["infer_peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    if train:
        targets = random_targets(batch, width, height, COCO_NUM_CLASSES, 5, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        model.train()

        def step() -> None:
            with autocast:
                losses = model(images, targets)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = time_call(step, warmup, iters, device)
        result["train_s_per_step"] = seconds
        result["train_images_per_s"] = batch / seconds
        if device.type == "cuda":
            result["train_peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vig_tiny", help="timm name of a ViG model (vig_tiny, vig_h_tiny, ...)")
    parser.add_argument("--size", type=int, nargs=2, default=(1333, 800), metavar=("W", "H"))
    parser.add_argument("--batch", type=int, default=2, help="images per step (paper: 16 over 8 GPUs = 2 per GPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--no-train", action="store_true", help="time inference only")
    args = parser.parse_args(argv)
    width, height = args.size
    result = benchmark(args.model, width, height, args.batch, args.dtype, args.warmup, args.iters, not args.no_train)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
