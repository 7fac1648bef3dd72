"""The paper's path at the paper's shape, with local stand-ins for what the Hugging Face Hub would give.

    python bench/paper_dry_run.py                               # CPU: the sweep on 2 of 32 layers, then one full-depth run
    python bench/paper_dry_run.py --device cuda --sweep_layers 32   # a GPU: the whole sweep at full depth

What runs is exactly what a user with the Hub runs (``config/paper_llama2_7b.json``, ``eval_all.sh llama2_7b``,
``summarize_results.py``); only the files the profile names are replaced:

- base model: a randomly initialised ``LlamaForCausalLM`` with Llama-2-7b's config (hidden 4096, 32 heads,
  intermediate 11008, vocabulary 32,000, 32 layers), saved in bfloat16, with a 32,000-token BPE tokenizer trained on
  the project's data (Llama-2's own tokenizer is gated on the Hub);
- adapters: 48 random LoRAs of the released adapters' shape (r 8, alpha 16, ``q_proj`` and ``v_proj`` of every
  layer), one per task of the paper's evaluation set, named ``llama2_7b_lora-<task>`` and found through
  ``--adapter_pattern`` as the profile finds ``Styxxxx/llama2_7b_lora-{name}``;
- retriever: a local sentence-transformers model (the embedded all-MiniLM-L6-v2, copied into a folder) used with the
  profile's instruction and INSTRUCTOR-style pooling (the instruction left out of the mean);
- data: the paper's formats (``config2.json``: 48 entries of 20 samples; ``combined_test.json``: rows of
  ``{inputs, targets, task, domain, metric}``) for its 48 tasks, 10 domains and metrics, with synthetic text,
  ``--rows_per_task`` rows per task.

On a CPU the full 32 layers are too slow for a sweep, so the sweep runs the model cut to ``--sweep_layers`` layers
at full width (the adapters are made for that depth); then one ``main.py`` run with all 32 layers and
``--full_rows`` rows measures load time and peak memory at full depth. Every stage's time and the peak resident
memory of each process are written to ``<work_dir>/report.json`` and as a Markdown table to stdout (``--out_md`` to
a file as well). Needs about 16 GB of memory and 30 GB of disk for the full-depth stage; ``--skip_full`` leaves it out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("paper_dry_run")

# The paper's evaluation set: 48 tasks, their domains and metrics (the released combined_test.json / config2.json).
PAPER_TASKS = [
    ("web_nlg_en", "struct to text", "rouge"), ("dart", "struct to text", "rouge"), ("e2e_nlg", "struct to text", "rouge"),
    ("common_gen", "struct to text", "rouge"), ("story_cloze", "commonsense", "em"), ("piqa", "commonsense", "em"),
    ("copa", "commonsense", "em"), ("hellaswag", "commonsense", "em"), ("sst2", "sentiment", "em"),
    ("yelp_polarity_reviews", "sentiment", "em"), ("imdb_reviews", "sentiment", "em"), ("sentiment140", "sentiment", "em"),
    ("multirc", "reading comp", "em"), ("squad_v2", "reading comp", "em"), ("squad_v1", "reading comp", "em"),
    ("openbookqa", "reading comp", "em"), ("bool_q", "reading comp", "em"), ("drop", "reading comp", "em"),
    ("natural_questions", "closed_book QA", "em"), ("arc_easy", "closed_book QA", "em"),
    ("arc_challenge", "closed_book QA", "em"), ("trivia_qa", "closed_book QA", "em"),
    ("definite_pronoun_resolution", "coreference", "em"), ("wsc", "coreference", "em"),
    ("cosmos_qa", "read.comp.w:commonsense", "em"), ("record", "read.comp.w:commonsense", "em"),
    ("paws_wiki", "paraphrase", "em"), ("glue_qqp", "paraphrase", "em"), ("glue_mrpc", "paraphrase", "em"),
    ("stsb", "paraphrase", "em"), ("cb", "nli", "em"), ("wnli", "nli", "em"), ("mnli_matched", "nli", "em"),
    ("mnli_mismatched", "nli", "em"), ("anli_r1", "nli", "em"), ("anli_r2", "nli", "em"), ("anli_r3", "nli", "em"),
    ("snli", "nli", "em"), ("qnli", "nli", "em"), ("rte", "nli", "em"),
    ("wmt16_translate_tren", "translation", "bleu"), ("wmt16_translate_deen", "translation", "bleu"),
    ("wmt16_translate_ruen", "translation", "bleu"), ("wmt16_translate_fien", "translation", "bleu"),
    ("wmt16_translate_roen", "translation", "bleu"), ("wmt14_enfr", "translation", "bleu"),
    ("wmt16_translate_csen", "translation", "bleu"), ("para_crawl_enes", "translation", "bleu"),
]
# Llama-2-7b's config.json (architecture fields).
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
PAPER_ROWS = ["base", "best_selection", "selection", "selection_ood", "mixture", "mixture_ood", "fusion", "fusion_ood"]
COMPARISON_ROWS = ["mixture_softmax", "mixture_softmax_ood", "soup", "soup_ood", "lorahub", "lorahub_task",
                   "lorahub_task_ood", "arrow", "arrow_ood"]
PROFILE = ROOT / "config" / "paper_llama2_7b.json"


def corpus_texts() -> list[str]:
    """Text to train the stand-in tokenizer on: every input and target of the project's data files."""
    texts = []
    for path in sorted((ROOT / "data").rglob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        rows = doc if isinstance(doc, list) else []
        for row in rows:
            if isinstance(row, dict):
                texts.extend(str(row.get(k, "")) for k in ("inputs", "targets") if row.get(k))
                for s in row.get("sample", []) or []:
                    if isinstance(s, dict):
                        texts.append(str(s.get("inputs", "")))
    return texts


def make_tokenizer(folder: Path, vocab_size: int) -> int:
    """A byte-level BPE tokenizer with Llama-2's special tokens (<unk> 0, <s> 1, </s> 2); returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_texts(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return len(fast)


def make_base_model(folder: Path, layers: int, tokenizer_dir: Path) -> None:
    """Llama-2-7b's architecture with random weights and ``layers`` decoder layers, saved in bfloat16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.dtype = torch.bfloat16
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, tmp / f.name)
    del model
    tmp.rename(folder)


def make_adapters(folder: Path, layers: int, rank: int = 8, seed: int = 0) -> None:
    """48 random PEFT LoRAs (r ``rank``, alpha 2r, q_proj and v_proj of each layer), bfloat16 safetensors."""
    import torch
    from safetensors.torch import save_file

    h = LLAMA2_7B["hidden_size"]
    gen = torch.Generator().manual_seed(seed)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for task, _, _ in PAPER_TASKS:
        path = tmp / f"llama2_7b_lora-{task}"
        path.mkdir(parents=True)
        tensors = {}
        for i in range(layers):
            for proj in ("q_proj", "v_proj"):
                key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, h, generator=gen) / h ** 0.5).to(torch.bfloat16)
                tensors[f"{key}.lora_B.weight"] = (torch.randn(h, rank, generator=gen) * 0.02).to(torch.bfloat16)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.05,
            "target_modules": ["q_proj", "v_proj"], "bias": "none", "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    tmp.rename(folder)


def make_data(work: Path, rows_per_task: int, input_words: int, seed: int = 0) -> None:
    """config2.json (20 samples per task) and combined_test.json (``rows_per_task`` per task), the paper's formats.

    Each task has its own seeded vocabulary, so that its inputs resemble each other and the retriever finds the task,
    as it does with the paper's data.
    """
    rng = random.Random(seed)
    words = sorted({w.strip(".,;:!?\"'()").lower() for t in corpus_texts()[:20000] for w in t.split()
                    if w.isascii() and w.strip(".,;:!?\"'()").isalpha() and 3 <= len(w) <= 10})
    pool, test = [], []
    for task, domain, metric in PAPER_TASKS:
        vocab = rng.sample(words, 60)
        lead = f"{task.replace('_', ' ')}: " + " ".join(rng.sample(vocab, 6))

        def row(i: int) -> dict:
            text = lead + " " + " ".join(rng.choice(vocab) for _ in range(input_words))
            target = " ".join(rng.sample(vocab, 3 if metric == "em" else 12))
            return {"inputs": text + "\n\nOPTIONS:\n- " + "\n- ".join(rng.sample(vocab, 2)) if metric == "em" else text,
                    "targets": target}

        pool.append({"model_name": task, "domain": domain, "sample": [row(i) for i in range(20)]})
        test.extend({**row(i), "task": task, "domain": domain, "metric": metric} for i in range(rows_per_task))
    (work / "config2.json").write_text(json.dumps(pool, indent=1))
    (work / "combined_test.json").write_text(json.dumps(test, indent=1))


def make_retriever(folder: Path) -> None:
    """A local sentence-transformers folder: the embedded all-MiniLM-L6-v2, copied."""
    from utils.model_loading import locate_embedded

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(locate_embedded("embedded:all-minilm-l6-v2"), tmp)
    tmp.rename(folder)


def run_measured(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd``; its wall time and the peak resident memory of the process (and what it waited for)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def stage(report: dict, name: str, fn, *args) -> None:
    t0 = time.perf_counter()
    fn(*args)
    report["stages"][name] = {"wall_s": round(time.perf_counter() - t0, 1)}
    logger.info("%s: %.1f s", name, time.perf_counter() - t0)


def pool_flags(work: Path, layers_dir: str, device: str) -> list[str]:
    return ["--base_model", str(work / f"base_{layers_dir}"), "--retriever", str(work / "lora_retriever"),
            "--config_path", str(work / "config2.json"),
            "--adapter_pattern", str(work / f"loras_{layers_dir}" / "llama2_7b_lora-{name}"), "--device", device]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="paper_dry_run", help="where the stand-ins and results go (reused when present)")
    p.add_argument("--sweep_layers", type=int, default=2, help="decoder layers of the model the sweep runs (full width)")
    p.add_argument("--rows_per_task", type=int, default=2, help="test rows per task (48 tasks)")
    p.add_argument("--input_words", type=int, default=24, help="words of synthetic text per input")
    p.add_argument("--max_new_tokens", type=int, default=None, help="override the profile's 50 new tokens in the sweep")
    p.add_argument("--full_rows", type=int, default=4, help="rows of the full-depth run")
    p.add_argument("--full_new_tokens", type=int, default=8, help="new tokens per row in the full-depth run")
    p.add_argument("--skip_full", action="store_true", help="leave out the full-depth stage")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out_md", default=None, help="also write the Markdown report to this file")
    p.add_argument("--make_base_model", nargs=3, metavar=("DIR", "LAYERS", "TOKENIZER_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.make_base_model:
        folder, layers, tokenizer_dir = args.make_base_model
        make_base_model(Path(folder), int(layers), Path(tokenizer_dir))
        return 0
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report = {"settings": vars(args), "stages": {}, "profile": json.loads(PROFILE.read_text())}
    py = sys.executable

    tok_dir = work / "tokenizer"
    if not tok_dir.exists():
        stage(report, "tokenizer (32,000-token BPE)", make_tokenizer, tok_dir, LLAMA2_7B["vocab_size"])
    sweep_tag, full_tag = f"L{args.sweep_layers}", "L32"
    for tag, layers in [(sweep_tag, args.sweep_layers)] + ([] if args.skip_full else [(full_tag, 32)]):
        if not (work / f"base_{tag}").exists():
            # in a process of its own: this one stays small, so that the peak memory of the stages below is theirs
            # (a child process starts from its parent's peak resident memory)
            report["stages"][f"base model, {layers} layers, bf16, written"] = run_measured(
                [py, __file__, "--make_base_model", str(work / f"base_{tag}"), str(layers), str(tok_dir)], work / f"make_{tag}.log")
        if not (work / f"loras_{tag}").exists():
            stage(report, f"48 LoRAs for {layers} layers, written", make_adapters, work / f"loras_{tag}", layers)
    if not (work / "combined_test.json").exists():
        stage(report, "data in the paper's formats", make_data, work, args.rows_per_task, args.input_words)
    if not (work / "lora_retriever").exists():
        stage(report, "local retriever", make_retriever, work / "lora_retriever")

    # The sweep: eval_all.sh's paper rows on the profile, the stand-ins given as EXTRA_ARGS, then the summary.
    extra = pool_flags(work, sweep_tag, args.device)
    if args.max_new_tokens:
        extra += ["--max_new_tokens", str(args.max_new_tokens)]
    out = work / "results"
    env = {"PYTHON": py, "DATA": str(work / "combined_test.json"), "OUT": str(out), "EXTRA_ARGS": " ".join(extra),
           "SKIP": " ".join(COMPARISON_ROWS), "FORCE": "1", "HF_HUB_OFFLINE": "1"}
    logger.info("Sweep: eval_all.sh llama2_7b, %d rows, model of %d layers", 48 * args.rows_per_task, args.sweep_layers)
    report["stages"]["sweep (eval_all.sh llama2_7b, 8 runs, summary)"] = run_measured(
        ["bash", "eval_all.sh", "llama2_7b"], work / "sweep.log", env)
    runs = {}
    for name in PAPER_ROWS:
        meta = json.loads((out / f"{name}.json").read_text())["meta"]
        runs[name] = {**meta["timing_s"], "generated_tokens": meta.get("generated_tokens")}
    report["runs"] = runs
    top1 = json.loads((out / "selection.json").read_text())["rows"]
    top3 = json.loads((out / "mixture.json").read_text())["rows"]
    report["retrieval"] = {"rows": len(top1),
                           "top1_own_task": round(100 * sum(r["adapters"][0] == r["task"] for r in top1) / len(top1), 2),
                           "top3_own_task": round(100 * sum(r["task"] in r["adapters"] for r in top3) / len(top3), 2)}
    report["summary"] = (out / "summary" / "domain.md").read_text()

    if not args.skip_full:
        load = ["-c", ("import time,sys; sys.path.insert(0, '.'); t=time.perf_counter(); "
                       "from utils.model_loading import load_base_model; "
                       f"load_base_model({str(work / f'base_{full_tag}')!r}, dtype='bfloat16', device={args.device!r}); "
                       "print(f'load {time.perf_counter()-t:.1f}')")]
        report["stages"]["load the 32-layer model (bf16)"] = run_measured([py] + load, work / "load.log")
        cmd = [py, "main.py", "--settings", str(PROFILE), "--data_path", str(work / "combined_test.json"),
               "--res_path", str(work / "full_depth" / "mixture.json"), "--eval_type", "mixture", "--lora_num", "3",
               "--limit", str(args.full_rows), "--batch_size", str(args.full_rows),
               "--max_new_tokens", str(args.full_new_tokens), "--no_resume"] + pool_flags(work, full_tag, args.device)
        shutil.rmtree(work / "full_depth", ignore_errors=True)
        report["stages"][f"main.py, 32 layers, mixture, {args.full_rows} rows"] = run_measured(cmd, work / "full_depth.log",
                                                                                                  {"HF_HUB_OFFLINE": "1"})
        meta = json.loads((work / "full_depth" / "mixture.json").read_text())["meta"]
        report["full_depth"] = {**meta["timing_s"], "generated_tokens": meta.get("generated_tokens")}

    (work / "report.json").write_text(json.dumps(report, indent=1))
    md = to_markdown(report)
    sys.stdout.write(md)
    if args.out_md:
        Path(args.out_md).write_text(md)
    return 0


def to_markdown(report: dict) -> str:
    lines = ["| stage | wall time | peak RSS |", "|---|---:|---:|"]
    for name, s in report["stages"].items():
        rss = f"{s['peak_rss_mb']:,} MB" if "peak_rss_mb" in s else ""
        lines.append(f"| {name} | {s['wall_s']:.1f} s | {rss} |")
    lines += ["", "| run | retrieval s | generation s | total s | generated tokens |", "|---|---:|---:|---:|---:|"]
    for name, r in report["runs"].items():
        lines.append(f"| {name} | {r['retrieval']} | {r['generation']} | {r['total']} | {r['generated_tokens']} |")
    if "full_depth" in report:
        r = report["full_depth"]
        lines.append(f"| mixture, 32 layers | {r['retrieval']} | {r['generation']} | {r['total']} | {r['generated_tokens']} |")
    ret = report["retrieval"]
    lines += ["", f"Retrieval on the {ret['rows']} rows (the profile's retriever settings): own task first {ret['top1_own_task']}%, "
                  f"in the top 3 {ret['top3_own_task']}%."]
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    sys.exit(main())
