"""The adapter pool: read on first use with peft's readers, three tiers with LRU eviction, adapters refused with the culprit."""

import json
import shutil

import pytest
import torch

from utils.adapter_pool import AdapterPool, PoolFull
from utils.composition import LiveComposition, compose
from utils.data import InputError, PoolEntry


def load_base(tiny_base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base).eval()


@pytest.fixture(scope="module")
def many_loras(tiny_base, tmp_path_factory):
    """Eight small adapters of one shape (for the tiers)."""
    from tests.helpers import make_lora

    d = tmp_path_factory.mktemp("many_loras")
    return {f"a{i}": make_lora(tiny_base, d / f"a{i}", r=2, alpha=4, seed=100 + i) for i in range(8)}


def entries_of(loras):
    return [PoolEntry(name=n, domain="d", samples=["x"], path=str(p)) for n, p in loras.items()]


def test_start_up_reads_no_weights_and_the_first_use_reads_one(tiny_base, many_loras, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(many_loras["a0"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    loras = dict(many_loras, broken=broken)
    pool = AdapterPool(load_base(tiny_base), entries_of(loras), show_progress=False)
    assert pool.stats.loads == 0 and pool.tier_counts()["disk"] == 9  # a broken adapter does not stop start-up
    with compose(pool, pool.indices([["a3"]]), torch.ones(1, 1)):
        pass
    assert pool.stats.loads == 1 and pool.tier_counts()["host"] == 1
    with pytest.raises(InputError, match="'broken'.*cannot read the weights"):
        pool.acquire(["broken"])
    assert not pool.pinned()
    with pytest.raises(InputError, match="'broken'"):
        AdapterPool(load_base(tiny_base), entries_of(loras), show_progress=False, eager=True)


def test_lru_tiers_never_evict_an_adapter_in_use(tiny_base, many_loras):
    pool = AdapterPool(load_base(tiny_base), entries_of(many_loras), show_progress=False, max_loras=3, max_cpu_loras=4)
    pool.acquire(["a0", "a1"])
    pool.acquire(["a2"])
    with pytest.raises(PoolFull, match="--max_loras 3"):
        pool.acquire(["a3"])
    pool.release(["a2"])
    pool.acquire(["a3"])  # a2 is the unpinned one: it leaves the device tier
    assert pool.tier_counts()["device"] == 3 and pool.stats.evictions_device == 1
    pool.release(["a3"])
    for n in ("a4", "a5", "a6"):
        pool.acquire([n])
        pool.release([n])
        assert {"a0", "a1"} <= set(pool._device) and {"a0", "a1"} <= set(pool._host), "pinned adapters stay"
    assert pool.tier_counts()["host"] == 4 and pool.stats.evictions_host >= 2
    loads = pool.stats.loads
    pool.acquire(["a2"])  # evicted from the host tier: read from disk again
    assert pool.stats.loads == loads + 1
    pool.release(["a0", "a1", "a2"])
    assert not pool.pinned()


def test_prefetch_reads_into_the_host_tier_in_the_background(tiny_base, many_loras):
    pool = AdapterPool(load_base(tiny_base), entries_of(many_loras), show_progress=False)
    pool.prefetch(["a1", "a2", "a2"])
    pool.load(["a1", "a2"])  # waits for the reads in flight instead of reading again
    assert pool.stats.loads == 2 and pool.tier_counts()["host"] == 2
    pool.close()


def test_an_unloaded_adapter_stays_for_the_rows_using_it(tiny_base, many_loras):
    pool = AdapterPool(load_base(tiny_base), entries_of(many_loras), show_progress=False)
    live = LiveComposition(pool)
    ids = pool.indices([["a0", "a1"]])[0].tolist()
    with live.active():
        live.set_rows([(1, ids, [0.5, 0.5], False)])
        pool.hold(["a2"])
        pool.remove("a0")
        pool.remove("a2")
        assert "a0" not in pool.names and "a0" in pool._device, "a running row keeps it"
        pool.load(["a2"])  # a request routed to a2 before the unload can still read it
        with pytest.raises(InputError, match="still running"):
            pool.add(PoolEntry("a0", "d", ["x"], str(many_loras["a0"])))
        live.forget([1])
        pool.unhold(["a2"])
    assert "a0" not in pool._device and "a0" not in pool._host and "a2" not in pool._host
    pool.add(PoolEntry("a0", "d", ["x"], str(many_loras["a0"])))
    assert pool.index["a0"] not in ids, "a name loaded again gets a new id"


def test_rows_needing_more_adapters_than_max_loras_are_cut_into_fitting_batches(tiny_base, many_loras):
    """The evaluation forms batches that fit --max_loras, and every row equals the row composed alone."""
    from utils.evaluation import fitting_batches

    names = list(many_loras)
    rows = [[names[i % 8], names[(i + 1) % 8], names[(i + 3) % 8]] for i in range(6)]
    batches = fitting_batches(list(range(6)), rows, 4)
    assert [i for b in batches for i in b] == list(range(6))
    assert all(len({n for i in b for n in rows[i]}) <= 4 for b in batches) and len(batches) > 1
    with pytest.raises(InputError, match="raise --max_loras to at least 3"):
        fitting_batches([0], rows, 2)
    pool = AdapterPool(load_base(tiny_base), entries_of(many_loras), show_progress=False, max_loras=4, max_cpu_loras=4)
    ids = torch.randint(2, 300, (6, 5), generator=torch.Generator().manual_seed(0))
    w = torch.full((6, 3), 1 / 3)
    got = {}
    with torch.no_grad():
        for b in batches:
            with compose(pool, pool.indices([rows[i] for i in b]), w[b]) as m:
                for j, i in enumerate(b):
                    got[i] = m(input_ids=ids[b]).logits[j]
        for i in range(6):
            with compose(pool, pool.indices([rows[i]]), w[[i]]) as m:
                torch.testing.assert_close(got[i], m(input_ids=ids[[i]]).logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("change, match", [
    ("dora", "uses DoRA"),
    ("modules_to_save", "saves whole modules"),
    ("ia3", "not a LoRA"),
    ("other_base", "does not fit the base model"),
    ("missing_module", "not a linear layer of the base model"),
    ("no_weights", "cannot read the weights"),
])
def test_adapters_that_cannot_compose_are_refused_naming_the_adapter(tiny_base, many_loras, tmp_path, change, match):
    from safetensors.torch import load_file, save_file

    d = tmp_path / change
    shutil.copytree(many_loras["a0"], d)
    cfg_file = d / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    weights = load_file(d / "adapter_model.safetensors")
    if change == "dora":
        cfg["use_dora"] = True
    elif change == "modules_to_save":
        cfg["modules_to_save"] = ["lm_head"]
    elif change == "ia3":
        cfg["peft_type"] = "IA3"
    elif change == "other_base":
        weights = {k: torch.cat([v, v], dim=1) if ".lora_A." in k else v for k, v in weights.items()}
    elif change == "missing_module":
        key = next(iter(weights))
        weights[key.replace("self_attn", "cross_attn")] = weights[key].clone()
    elif change == "no_weights":
        (d / "adapter_model.safetensors").unlink()
    cfg_file.write_text(json.dumps(cfg))
    if (d / "adapter_model.safetensors").exists():
        save_file(weights, d / "adapter_model.safetensors")
    pool = AdapterPool(load_base(tiny_base), entries_of({"a1": many_loras["a1"]}), show_progress=False)
    with pytest.raises(InputError, match=match) as err:
        pool.read("newcomer", str(d))
    assert "'newcomer'" in str(err.value)
    assert pool.names == ["a1"]
