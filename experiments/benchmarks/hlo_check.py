"""Frozen layers cost only their forward pass: proof from the compiled (optimised) HLO.

For the product's jitted steps (``flaxcnn.bench.build_step`` -> ``flaxcnn.phases``) this
prints XLA's flop count and, for every dot / convolution / reduction left after optimisation,
whether it belongs to the forward or the backward pass (``transpose(jvp(...))`` in its
metadata) and which Keras layer it comes from. It then checks that

* the head step (backbone frozen) has backward ops in the head only, and costs about the flops
  of inference;
* the fine-tuning step (from Keras layer 100) has backward ops only in ``block_11_depthwise``
  and later layers (``block_11_expand``, layer 99, is frozen and needs no input gradient).

    python experiments/benchmarks/hlo_check.py [--image-size 160] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import sys

from flaxcnn import bench
from flaxcnn.models import get_backbone


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--conv-impl", default="auto")
    args = parser.parse_args(argv)
    b, s = args.batch_size, args.image_size
    backbone = get_backbone(args.model)
    names = list(backbone.layer_names(False))
    first_trainable = names.index(backbone.fine_tune_layer(backbone.default_fine_tune_at))
    failures, flops = [], {}
    for row in ("inference", "head", "finetune", "full"):
        step = bench.build_step(row, b, s, model=backbone.name, conv_impl=args.conv_impl)
        compiled = step.compiled
        flops[row] = compiled.cost_analysis()["flops"]
        counts, layers = bench.backward_ops_by_layer(compiled.as_text(), names)
        layer_list = sorted(layers, key=lambda n: names.index(n) if n in names else 999)
        print(f"{row}: {flops[row] / 1e9:.2f} GFLOP; ops {dict(sorted(counts.items()))}")
        print(f"  layers with backward ops ({len(layers)}): {', '.join(layer_list) or '-'}")
        if row == "inference" and layers:
            failures.append("inference has backward ops")
        if row == "head" and layers - {"head"}:
            failures.append(f"head step differentiates {sorted(layers - {'head'})}")
        if row == "finetune":
            early = [n for n in layers if n in names and names.index(n) < first_trainable]
            if early:
                failures.append(f"fine-tuning step differentiates frozen layers {early}")
    extra = flops["head"] / flops["inference"] - 1
    print(f"head step flops / inference flops - 1 = {extra:+.2%}")
    print(f"fine-tune step flops / inference flops = {flops['finetune'] / flops['inference']:.2f}")
    print(f"full step flops / inference flops = {flops['full'] / flops['inference']:.2f}")
    if abs(extra) > 0.02:
        failures.append(f"head step does {extra:+.1%} more flops than inference")
    print("FAIL: " + "; ".join(failures) if failures else "OK: frozen layers run forward only")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
