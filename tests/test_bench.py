"""The throughput benchmark's synthetic mode (the one meant for a 7B-shaped model on a GPU), at a tiny shape on CPU."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def test_synthetic_throughput_bench_runs_every_configuration(tmp_path):
    import bench_throughput

    out = tmp_path / "bench.json"
    code = bench_throughput.main(["--synthetic", "tiny", "--num_adapters", "5", "--rows", "6", "--batch_sizes", "3",
                                  "--max_new_tokens", "3", "--repeats", "1", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["model"] == "synthetic tiny" and report["adapters"] == 5
    configs = {r["config"]: r for r in report["results"]}
    assert set(configs) == {"base", "mixture", "fusion", "selection", "original_mixture", "original_fusion", "peft_selection",
                            "base_file_order"}
    for r in configs.values():
        assert r["rows"] == 6 and r["tokens_per_s"] > 0
        assert r["generated_tokens"] == 6 * 3  # every row generated exactly 3 tokens
    md = out.with_suffix(".md").read_text()
    assert "| 3 | mixture |" in md and "mixture/original" in md


def test_synthetic_adapters_are_real_peft_adapters(tmp_path):
    import bench_throughput
    import torch

    from utils.data import load_rows

    rows = load_rows(ROOT / "data" / "bigbench" / "combined_test.json")
    model, entries = bench_throughput.synthetic_setup("tiny", 400, 3, 4, rows, tmp_path, "cpu", torch.float32)
    assert [e.name for e in entries] == ["syn000", "syn001", "syn002"]
    assert all(e.samples for e in entries) and entries[0].domain != entries[1].domain
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, entries[0].path)
    layer = peft_model.base_model.model.model.layers[1].self_attn.v_proj
    assert layer.lora_B["default"].weight.abs().sum() > 0  # nonzero B: the adapter changes the output
    assert float(layer.scaling["default"]) == 2.0


def test_forward_bench_op_timings(tmp_path):
    import bench_forward

    out = tmp_path / "fwd.json"
    assert bench_forward.main(["--skip_model", "--repeats", "1", "--out", str(out)]) == 0
    ops = json.loads(out.read_text())["ops"]
    assert len(ops) == 4 and all(o["bf16_fused_us"] > 0 and o["fp32_cast_us"] > 0 for o in ops)
    assert "| 8 x 250 | 24 |" in out.with_suffix(".md").read_text()


def test_serving_bench_runs_three_servers(tmp_path, tiny_base, tiny_loras):
    import bench_serve

    pool = [{"model_name": n, "domain": "d", "sample": [{"inputs": f"{n} text", "targets": "x"}], "path": str(p)} for n, p in tiny_loras.items()]
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    rows = [{"inputs": f"the movie number {i} was great", "targets": "x", "task": "t", "domain": "d", "metric": "em"} for i in range(6)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    out = tmp_path / "serve"
    code = bench_serve.main(["--data_path", str(tmp_path / "rows.json"), "--concurrency", "1", "2", "--min_requests", "3",
                             "--requests_per_client", "2", "--max_tokens", "3", "--spread", "1", "--repeats", "1",
                             "--configs", "lora", "same_adapters", "base", "--server_args", f"--base_model {tiny_base} --config_path {tmp_path / 'pool.json'}",
                             "--out", str(out)])
    assert code == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["results"]) == {"lora", "same_adapters", "base"}
    for levels in report["results"].values():
        assert [r["concurrency"] for r in levels] == [1, 2]
        for r in levels:
            assert r["requests"] == 4 if r["concurrency"] == 2 else r["requests"] == 3
            assert r["output_tokens_per_s"] > 0 and r["latency_p95_s"] >= r["latency_p50_s"]
    assert "lora against same_adapters" in out.with_suffix(".md").read_text()
