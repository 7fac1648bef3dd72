"""Data-parallel evaluation with torchrun (gloo on CPU) and device placement of the composition."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import write_json

ROOT = Path(__file__).resolve().parent.parent


def test_torchrun_two_processes_equals_single(tmp_path, tiny_base, tiny_loras):
    pool = [{"model_name": n, "domain": n, "sample": [f"{n} sample {i}" for i in range(3)], "path": str(p)} for n, p in tiny_loras.items()]
    rows = [{"inputs": f"{n} question number {i} " + "pad " * (i % 4), "targets": "x", "task": n, "domain": n, "metric": "em"}
            for i in range(5) for n in tiny_loras]
    data, pool_path = write_json(tmp_path / "data.json", rows), write_json(tmp_path / "pool.json", pool)

    def argv(res):
        return ["main.py", "--data_path", str(data), "--config_path", str(pool_path), "--res_path", str(res),
                "--base_model", str(tiny_base), "--retriever", "embedded:all-minilm-l6-v2", "--max_new_tokens", "5",
                "--batch_size", "3", "--lora_num", "2", "--device", "cpu", "--log_level", "WARNING"]

    single = tmp_path / "single.json"
    done = subprocess.run([sys.executable, *argv(single)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    # Two processes, running a sweep of two runs (each rank takes every other batch of each run, rank 0 merges).
    sweep = argv(tmp_path / "unused.json")
    sweep = sweep[: sweep.index("--res_path")] + sweep[sweep.index("--res_path") + 2:]
    sweep += ["--res_dir", str(tmp_path / "multi"), "--runs", "mixture", "plain --eval_type base"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *sweep],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads((tmp_path / "multi" / "mixture.json").read_text())
    assert b["meta"]["world_size"] == 2
    assert a["rows"] == b["rows"]
    plain = json.loads((tmp_path / "multi" / "plain.json").read_text())
    assert len(plain["rows"]) == len(rows) and all(r["adapters"] == [] for r in plain["rows"])
    assert not list(tmp_path.rglob("*.partial.jsonl"))


def test_stacked_weights_live_with_their_layers(tiny_base, tiny_loras):
    """With device_map the pool's stacks sit on each layer's device; results equal a plain load."""
    from transformers import AutoModelForCausalLM

    from utils.adapter_pool import AdapterPool
    from utils.composition import compose
    from utils.data import PoolEntry

    entries = [PoolEntry(n, "d", ["x"], str(p)) for n, p in tiny_loras.items()]
    mapped = AdapterPool(AutoModelForCausalLM.from_pretrained(tiny_base, device_map="auto"), entries, show_progress=False)
    plain = AdapterPool(AutoModelForCausalLM.from_pretrained(tiny_base), entries, show_progress=False)
    names = list(tiny_loras)
    mapped.acquire(names)
    for _, module, A, B in mapped.gather([names], len(names)):
        dev = module.weight.device
        assert A.device == dev and B.device == dev
    mapped.release(names)
    ids = torch.randint(2, 300, (2, 6))
    idx, w = mapped.indices([["alpha", "beta"], ["gamma", "alpha"]]), torch.full((2, 2), 0.5)
    with torch.no_grad():
        with compose(mapped, idx, w) as m:
            got = m(input_ids=ids).logits
        with compose(plain, idx, w) as m:
            want = m(input_ids=ids).logits
    torch.testing.assert_close(got, want)


def test_main_flags_pass_through_the_launchers():
    """torchrun and accelerate launch parse their own options before the script's; a main.py flag that abbreviates
    two of theirs (as --run would --run-path / --run_path) makes the launcher fail before main.py starts."""
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    import main as main_mod

    flags = [s for a in main_mod.build_parser()._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    for flag in flags:
        ours = ["main.py", flag, "x"]
        assert get_args_parser().parse_args(["--nproc_per_node", "2", *ours]).training_script_args == ours[1:], flag
        assert launch_command_parser().parse_args(["--num_processes", "2", *ours]).training_script_args == ours[1:], flag
