"""The README's table of registered models: parameters, FLOPs, Keras's top-1, CPU img/s.

    PYTHONPATH=. python experiments/benchmarks/models_table.py                 # static columns
    PYTHONPATH=. python experiments/benchmarks/models_table.py --speed-from compare_rows.jsonl

Parameters are those of the model with its 1000-class top, counted as Keras's
``count_params`` does (BatchNorm statistics included). FLOPs are XLA's count for one image at
the model's default size (two per multiply-add), read from the lowered inference program
(nothing is compiled). Top-1 is what Keras publishes (``Backbone.imagenet_top1``).
``--speed-from`` adds the img/s of flaxcnn's ``inference`` and ``finetune`` steps from
``compare_keras.py --jsonl`` rows (the median over all its timed steps of both rounds), so that
the table shows what the side-by-side comparison with Keras measured; models it did not time
show "-".
"""

from __future__ import annotations

import argparse
import json
import os


def static_row(name: str) -> dict:
    import jax
    import jax.numpy as jnp

    from flaxcnn import models

    backbone = models.get_backbone(name)
    module = backbone.build(include_top=True)
    size = backbone.default_input_size
    image = jnp.zeros((1, size, size, 3))
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), image)
    params = sum(leaf.size for leaf in jax.tree.leaves(variables))
    lowered = jax.jit(module.apply).lower(variables, image)
    flops = lowered.cost_analysis()["flops"]
    return {"model": name, "keras": backbone.keras_name, "size": size, "params": params,
            "gflops": flops / 1e9, "top1": backbone.imagenet_top1}  # fmt: skip


def speed_from(path: str) -> dict[str, dict]:
    """``model -> {row: {'img_s', ...}}`` from flaxcnn's step rows of compare_keras.py."""
    import statistics

    steps: dict[tuple[str, str], list] = {}
    batch = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "step" and r.get("side") == "flaxcnn":
                steps.setdefault((r["model"], r["row"]), []).extend(r["ms"])
                batch[r["model"]] = r["batch_size"]
    out: dict[str, dict] = {}
    for (model, row), ms in steps.items():
        median = statistics.median(ms)
        out.setdefault(model, {})[row] = {"img_s": batch[model] * 1e3 / median,
                                          "ms_median": median, "ms_min": min(ms)}  # fmt: skip
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| model | Keras name | size | parameters | GFLOPs | ImageNet top-1 (Keras) "
             "| inference img/s | fine-tune img/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        top1 = f"{r['top1'] * 100:.1f}%" if r.get("top1") else "-"
        rate = lambda key, r=r: f"{r[key]['img_s']:.1f}" if key in r else "-"
        lines.append(
            f"| `{r['model']}` | {r['keras']} | {r['size']} | {r['params'] / 1e6:.1f}M "
            f"| {r['gflops']:.2f} | {top1} | {rate('inference')} | {rate('finetune')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma list (default: every registered model)")
    parser.add_argument("--speed-from", help="img/s from these compare_keras.py --jsonl rows")
    parser.add_argument("--jsonl", help="append each model's row here as it finishes")
    args = parser.parse_args()
    from flaxcnn import models

    names = args.models.split(",") if args.models else models.list_models()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    measured = speed_from(args.speed_from) if args.speed_from else {}
    rows = []
    for name in names:
        row = {**static_row(name), **measured.get(name, {})}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(f"load average at end: {os.getloadavg()}")
    print(markdown(rows))


if __name__ == "__main__":
    main()
