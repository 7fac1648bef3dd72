"""The linear layers' CPU kernel (utils/linear_kernels.py): oneDNN-packed weights give F.linear's results up to float
rounding, keep the modules nn.Linear for peft and the pool, follow a weight changed in place, leave gradients to
F.linear, compose exactly as on the plain model, and are refused or skipped with a reason where they cannot run."""

import pytest
import torch
from torch import nn

from tests.test_composition import load_base
from utils.data import InputError
from utils.linear_kernels import PackedLinear, onednn_supports, use_linear_kernels

pytestmark = pytest.mark.skipif(not onednn_supports(torch.float32), reason="this PyTorch build has no oneDNN")


def test_packed_linears_give_f_linears_logits_and_stay_nn_linear(tiny_base):
    plain, packed = load_base(tiny_base), load_base(tiny_base)
    keys = list(packed.state_dict())
    assert use_linear_kernels(packed, "onednn") == "onednn"
    linears = [m for m in packed.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is PackedLinear for m in linears)
    assert list(packed.state_dict()) == keys  # the packed copies are not state
    first = linears[0]._packed
    use_linear_kernels(packed, "onednn")
    assert linears[0]._packed is first  # asked again: weights already packed are not packed again
    ids = torch.randint(0, plain.config.vocab_size, (3, 11))
    with torch.no_grad():
        want, got = plain(input_ids=ids).logits, packed(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert use_linear_kernels(packed, "torch") == "torch"
    assert all(type(m) is nn.Linear for m in packed.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        assert torch.equal(packed(input_ids=ids).logits, want)


def test_a_weight_changed_in_place_or_replaced_is_packed_again():
    layer = nn.Linear(8, 5)
    use_linear_kernels(layer, "onednn")
    x = torch.randn(4, 8)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(2.0)  # in place: the version counter moves
        assert torch.allclose(layer(x), nn.functional.linear(x, layer.weight, layer.bias), atol=1e-6)
        layer.weight = nn.Parameter(torch.randn(5, 8))  # replaced
        assert torch.allclose(layer(x), nn.functional.linear(x, layer.weight, layer.bias), atol=1e-6)


def test_gradients_flow_through_f_linear():
    torch.manual_seed(0)
    packed, plain = nn.Linear(8, 5), nn.Linear(8, 5)
    plain.load_state_dict(packed.state_dict())
    use_linear_kernels(packed, "onednn")
    x1 = torch.randn(4, 8, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    packed(x1).square().sum().backward()
    plain(x2).square().sum().backward()
    assert torch.equal(x1.grad, x2.grad) and torch.equal(packed.weight.grad, plain.weight.grad)


@pytest.mark.parametrize("grouped", [False, True])
def test_composed_decoding_on_packed_weights_matches_the_plain_model(tiny_base, tiny_loras, grouped):
    from transformers import AutoTokenizer

    from tests.test_composition import make_pool
    from utils.composition import LiveComposition
    from utils.generation import generate_batch

    tok = AutoTokenizer.from_pretrained(tiny_base)
    prompts = ["the cat sat on the mat", "one two three four", "a"]
    second = "mixture" if grouped else "fusion"  # the grouped kernel serves mixtures (a fused row sends a batch per row)
    rows = [(["alpha", "beta"], [0.5, 0.5], "mixture"), (["gamma", "alpha"], [0.3, 0.7], second), ([], [], "mixture")]
    texts = {}
    for kernels in ("torch", "onednn"):  # onednn: packed weights, q/k/v and gate/up fused
        pool = make_pool(tiny_base, tiny_loras, ["alpha", "beta", "gamma"])
        use_linear_kernels(pool.model, kernels)
        live = LiveComposition(pool, grouped=grouped)
        with live.active() as model:
            texts[kernels] = generate_batch(model, tok, prompts, 24, composition=live, compositions=rows)
        assert (live.shared_forwards > 0) == grouped
    assert texts["onednn"] == texts["torch"]


def test_where_packing_cannot_run(tiny_base, monkeypatch):
    import utils.linear_kernels as lk

    with torch.device("meta"):
        meta = nn.Linear(8, 5)
    assert use_linear_kernels(meta, "auto") == "torch"
    with pytest.raises(InputError, match=r"--linear_kernels onednn: the model is on meta.*--linear_kernels torch"):
        use_linear_kernels(meta, "onednn")
    with pytest.raises(InputError, match="Unknown --linear_kernels 'fast'"):
        use_linear_kernels(nn.Linear(2, 2), "fast")
    half = nn.Linear(8, 5).half()
    assert use_linear_kernels(half, "auto") == "torch"  # no oneDNN kernel for float16
    monkeypatch.setattr(lk, "available_memory", lambda: 1024)  # the packed copies would not fit: auto keeps F.linear
    model = load_base(tiny_base)
    assert use_linear_kernels(model, "auto") == "torch"
    assert use_linear_kernels(model, "onednn") == "onednn"  # asked for explicitly


def test_sibling_projections_are_multiplied_as_one_with_the_same_logits(tiny_base):
    from utils.linear_kernels import FusedProjections

    separate, fused = load_base(tiny_base), load_base(tiny_base)
    use_linear_kernels(separate, "onednn", fuse=False)
    use_linear_kernels(fused, "onednn")
    layer = fused.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    assert isinstance(attn.q_proj._fused, FusedProjections) and attn.q_proj._fused is attn.v_proj._fused
    assert mlp.gate_proj._fused is mlp.up_proj._fused and mlp.down_proj._fused is None
    assert attn.o_proj._fused is None and separate.model.layers[0].self_attn.q_proj._fused is None
    group = attn.q_proj._fused
    use_linear_kernels(fused, "onednn")
    assert attn.q_proj._fused is group and group._packed is not None  # asked again: the same group, not packed again
    ids = torch.randint(0, fused.config.vocab_size, (3, 11))
    with torch.no_grad():
        want, got = separate(input_ids=ids).logits, fused(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)
    assert group._last is None  # every member took its columns: nothing is held between forwards
    use_linear_kernels(fused, "onednn", fuse=False)
    assert attn.q_proj._fused is None
    with torch.no_grad():
        assert torch.allclose(fused(input_ids=ids).logits, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_a_fused_member_gives_its_own_product_whatever_the_order_of_the_calls(tiny_base, mode):
    model = load_base(tiny_base)
    use_linear_kernels(model, "onednn")
    attn = model.model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    d = q.in_features
    x1, x2 = torch.randn(2, 5, d), torch.randn(1, 3, d)

    def want(m, x):
        return nn.functional.linear(x, m.weight, m.bias)

    bumped = q.register_forward_hook(lambda module, args, output: output.add_(1.0))  # a hook that writes in place
    with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
        calls = [(k, x1), (q, x2), (q, x2), (v, x1), (q, x1), (k, x2), (k, x2), (v, x2)]
        for m, x in calls:
            got = m(x)
            extra = 1.0 if m is q else 0.0
            assert got.shape == (*x.shape[:-1], m.out_features)
            assert torch.allclose(got, want(m, x) + extra, atol=1e-6), (m, x.shape)
        if mode == "no_grad":
            x = torch.randn(4, d)
            k(x)
            x.mul_(2.0)  # the input changed in place between two members' calls: multiplied again
            assert torch.allclose(v(x), want(v, x), atol=1e-6)
        q.weight.mul_(3.0)  # a member's weight changed in place: the group is packed again
        assert torch.allclose(k(x1), want(k, x1), atol=1e-6)
        assert torch.allclose(q(x1), want(q, x1) + 1.0, atol=1e-5)
    bumped.remove()


def test_projections_are_not_fused_where_they_cannot_be():
    class Attention(nn.Module):
        def __init__(self, k_in: int, bias: bool):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 4, bias=bias), nn.Linear(k_in, 4), nn.Linear(8, 4, bias=bias)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = nn.Linear(8, 6)  # no up_proj: nothing to fuse with

    for module in (Attention(6, True), Attention(8, False), MLP()):
        use_linear_kernels(module, "onednn")
        assert all(m._fused is None for m in module.modules() if isinstance(m, nn.Linear))
    same = Attention(8, True)
    use_linear_kernels(same, "onednn")
    assert same.q_proj._fused is not None and same.q_proj._fused.members == [same.q_proj, same.k_proj, same.v_proj]
    x = torch.randn(3, 8)
    with torch.no_grad():
        for m in (same.q_proj, same.k_proj, same.v_proj):
            assert torch.allclose(m(x), nn.functional.linear(x, m.weight, m.bias), atol=1e-6)
