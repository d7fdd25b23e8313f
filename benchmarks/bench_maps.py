"""How much the closed-form maps save: heatmaps for the class and K attributes of a batch.

Three ways to the same maps, timed in one process on the same model and batch:
  closed form   one forward, one einsum (eatdist's path for linear heads)
  batched grad  one forward, one batched autograd pass (eatdist's fallback for MLP heads)
  loop          one forward, one backward per target (the textbook Grad-CAM loop)
Prints images/s and the ratio to the loop. Not a test: timings depend on the machine.

    python benchmarks/bench_maps.py [--backbone test_resnet] [--size 64] [--batch 32] [--k 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from eatdist.explain.cam import closed_form_maps, gradcam_autograd, normalise_maps
from eatdist.models.eat import EATModel
from eatdist.models.registry import create_backbone


def loop_gradcam(model: EATModel, images: torch.Tensor, classes: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
    maps = []
    with torch.enable_grad():
        features = model.feature_map(images)
        class_logits, attr_logits = model.heads(features)
        scores = torch.cat([class_logits.gather(1, classes[:, None]), attr_logits.gather(1, attrs)], dim=1)
        for t in range(scores.shape[1]):
            (grad,) = torch.autograd.grad(scores[:, t].sum(), features, retain_graph=True)
            maps.append(torch.relu((grad.mean((2, 3))[:, :, None, None] * features).sum(1)))
    return torch.stack(maps, 1).detach()


def closed(model: EATModel, images: torch.Tensor, classes: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return closed_form_maps(model, model.feature_map(images), classes, attrs)


def timed(fn, *args, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn(*args)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    return (time.perf_counter() - start) / repeats, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=5, help="attribute maps per image")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = EATModel(create_backbone(args.backbone), num_classes=200, num_attributes=312).eval()
    images = torch.randn(args.batch, 3, args.size, args.size)
    classes = torch.randint(0, 200, (args.batch,))
    attrs = torch.randint(0, 312, (args.batch, args.k))
    results = {
        "loop (baseline)": timed(loop_gradcam, model, images, classes, attrs, repeats=args.repeats),
        "batched grad": timed(gradcam_autograd, model, images, classes, attrs, repeats=args.repeats),
        "closed form": timed(closed, model, images, classes, attrs, repeats=args.repeats),
    }
    reference = normalise_maps(results["loop (baseline)"][1])
    base = results["loop (baseline)"][0]
    print(f"{args.backbone}, {args.size} px, batch {args.batch}, 1 class + {args.k} attribute maps per image")
    print(f"{'method':18s} {'images/s':>10s} {'speed-up':>9s} {'max |diff|':>11s}")
    for name, (seconds, maps) in results.items():
        diff = (normalise_maps(maps) - reference).abs().max().item()
        print(f"{name:18s} {args.batch / seconds:10.1f} {base / seconds:8.2f}x {diff:11.2e}")


if __name__ == "__main__":
    main()
