"""Where LoraHub's search spends its time on the embedded pool, and whether its loss depends on threads or precision.

    python bench/bench_lorahub.py --out docs/bench_lorahub.json

The loss is the one the sweep's LoraHub rows search over (``utils.baselines.lorahub.FewShotLoss``, the embedded profile's 2
labelled samples per task, 13 adapters, fusion). Measured:

- one loss evaluation split into building the fused factors, the model's forwards and the cross-entropy, with the
  prompt tokens actually computed against the padded ones;
- one evaluation in float32 against bfloat16 autocast (on a CPU without bf16 instructions autocast is emulated);
- one evaluation with each kernel of the linear layers (``utils/linear_kernels.py``: PyTorch's F.linear, oneDNN-packed
  weights each projection on its own, and packed with q/k/v and gate/up fused, the default), fastest of 3
  interleaved, and the loss each gives;
- the loss at ``--vectors`` random weight vectors with 1 and with 2 intra-op threads, and in bfloat16: the largest
  difference to the float32 two-thread value, and whether the values are bit-identical;
- with ``--search``: the whole search (``learn_weights``, the profile's budget) with 1 and 2 threads, and whether
  the learned vectors are identical.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_helpers import cpu_name  # noqa: E402
from utils.adapter_pool import AdapterPool  # noqa: E402
from utils.composition import compose_shared  # noqa: E402
from utils.data import load_pool_config  # noqa: E402
from utils.baselines.lorahub import FewShotLoss, few_shot_examples, learn_weights  # noqa: E402
from utils.linear_kernels import use_linear_kernels  # noqa: E402
from utils.model_loading import load_base_model, load_tokenizer  # noqa: E402
from utils.prompter import Prompter  # noqa: E402

logger = logging.getLogger("bench")


def split_evaluation(loss: FewShotLoss, idx: list[int], w: np.ndarray) -> dict:
    """Seconds of one evaluation: factors, forwards, and the whole call."""
    pool = loss.pool
    t0 = time.perf_counter()
    with compose_shared(pool, idx, w.astype(np.float32), "fusion"):
        pass
    t_factors = time.perf_counter() - t0
    t_forward = 0.0
    with torch.inference_mode(), compose_shared(pool, idx, w.astype(np.float32), "fusion") as model:
        for ids, labels, mask, keep in loss.batches:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            t1 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep)
            t_forward += time.perf_counter() - t1
    t1 = time.perf_counter()
    loss(idx, w)
    t_total = time.perf_counter() - t1
    return {"factors_s": round(t_factors, 4), "forwards_s": round(t_forward, 3), "evaluation_s": round(t_total, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="config/embedded.json", help="profile giving the base model, pool and LoraHub settings")
    p.add_argument("--vectors", type=int, default=4, help="random weight vectors compared across threads and precisions")
    p.add_argument("--search", action="store_true", help="also run the whole search with 1 and with 2 threads")
    p.add_argument("--out", default=None, help="JSON file for the figures")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    profile = json.loads(Path(args.settings).read_text(encoding="utf-8"))
    entries = load_pool_config(profile["config_path"], None)
    tokenizer = load_tokenizer(profile["base_model"])
    model = load_base_model(profile["base_model"], dtype="float32", device="cpu")
    pool = AdapterPool(model, entries, show_progress=False)
    examples = few_shot_examples(entries, int(profile.get("lorahub_examples", 5)))
    loss = FewShotLoss(pool, tokenizer, Prompter(profile.get("template", "alpaca")), examples)
    idx = list(range(len(entries)))
    real = sum(int(m.sum()) for _, _, m, _ in loss.batches)
    padded = sum(int(m.numel()) for _, _, m, _ in loss.batches)
    out = {"cpu": cpu_name("unknown"), "threads": torch.get_num_threads(), "examples": loss.n_examples, "target_tokens": loss.n_tokens,
           "batches": len(loss.batches), "prompt_tokens": real, "padded_tokens": padded}
    rng = np.random.RandomState(0)
    vectors = [np.zeros(len(idx))] + [rng.uniform(-1.5, 1.5, len(idx)) for _ in range(args.vectors)]

    split_evaluation(loss, idx, vectors[1])  # warm-up
    out["split"] = split_evaluation(loss, idx, vectors[1])
    logger.info("One evaluation: %s", out["split"])
    t0 = time.perf_counter()
    loss(idx, vectors[1])
    t_fp32 = time.perf_counter() - t0
    loss.autocast_dtype = torch.bfloat16
    loss(idx, vectors[1])
    t0 = time.perf_counter()
    loss(idx, vectors[1])
    out["evaluation_s"] = {"float32": round(t_fp32, 3), "bfloat16_autocast": round(time.perf_counter() - t0, 3)}
    logger.info("One evaluation by precision: %s", out["evaluation_s"])
    loss.autocast_dtype = None
    used = model.linear_kernels
    by_kernels: dict[str, float] = {}
    loss_by_kernels: dict[str, float] = {}
    for kernels in ["torch", "onednn_separate", "onednn"] * 3:
        name = use_linear_kernels(model, kernels.split("_")[0], fuse=kernels == "onednn")
        if kernels == "onednn_separate" and name == "onednn":
            name = kernels
        t0 = time.perf_counter()
        loss_by_kernels[name] = loss(idx, vectors[1])
        by_kernels[name] = round(min(by_kernels.get(name, float("inf")), time.perf_counter() - t0), 3)
    use_linear_kernels(model, used)
    out["evaluation_s_by_linear_kernels"] = by_kernels
    out["loss_by_linear_kernels"] = loss_by_kernels
    out["linear_kernels"] = used
    logger.info("One evaluation by linear kernels: %s (the rest of this run: %s)", by_kernels, used)

    values = {}
    for name, threads, dtype in (("fp32_2threads", 2, None), ("fp32_1thread", 1, None), ("bf16_2threads", 2, torch.bfloat16)):
        torch.set_num_threads(threads)
        loss.autocast_dtype = dtype
        values[name] = [loss(idx, w) for w in vectors]
    torch.set_num_threads(2)
    loss.autocast_dtype = None
    ref = values["fp32_2threads"]
    out["loss_values"] = values
    out["max_abs_diff_to_fp32_2threads"] = {k: max(abs(a - b) for a, b in zip(v, ref)) for k, v in values.items() if k != "fp32_2threads"}
    out["bit_identical_to_fp32_2threads"] = {k: v == ref for k, v in values.items() if k != "fp32_2threads"}
    logger.info("Largest difference to float32 with 2 threads: %s", out["max_abs_diff_to_fp32_2threads"])

    if args.search:
        searches = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            learned = learn_weights(loss, [e.name for e in entries], pool.index, int(profile.get("lorahub_budget", 40)), 42)
            searches[f"{threads}_threads"] = {"weights": learned.weights, "loss": learned.loss, "seconds": learned.seconds}
            logger.info("Search with %d threads: %.1f s, loss %.6f", threads, learned.seconds, learned.loss)
        out["search"] = searches
        out["search_identical"] = searches["1_threads"]["weights"] == searches["2_threads"]["weights"]
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
