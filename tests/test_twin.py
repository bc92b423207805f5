"""Twins of a model for sampling: the hookless one ZeRO-3's gathered generation runs, and the one whose Linear
weights are cast once for a generation under autocast."""

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

from tidpo_cli.modeling import build_tiny_llama
from tidpo_cli.tokenizer import build_byte_tokenizer
from tidpo_cli.twin import autocast_dtype, autocast_weights, hookless_twin

TOKENIZER = build_byte_tokenizer()
IDS = torch.tensor([[257, 10, 11, 12], [257, 20, 21, 22]])
BF16 = torch.bfloat16


def llama(**config):
    torch.manual_seed(0)
    return build_tiny_llama({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "num_key_value_heads": 2, **config}, TOKENIZER).eval()


def linears(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def test_hookless_twin_shares_the_weights_and_drops_only_the_named_hooks():
    torch.manual_seed(0)
    shared = torch.nn.Linear(3, 3)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    calls = []
    dropped = model[1].register_forward_hook(lambda *_: calls.append("dropped"))
    kept = model[1].register_forward_pre_hook(lambda *_: calls.append("kept"))
    twin = hookless_twin(model, {dropped.id})
    x = torch.randn(2, 3)
    assert torch.equal(twin(x), model(x)) and calls == ["kept", "kept", "dropped"]  # twin's call, then the model's
    assert twin[0] is twin[2] and twin[0] is not shared and twin[0].weight is shared.weight
    assert list(model[1]._forward_hooks) == [dropped.id] and kept.id in model[1]._forward_pre_hooks
    with torch.no_grad():
        shared.weight.zero_()  # a change of the weights is the twin's at once
    assert torch.equal(twin(x), model(x))


def test_a_twin_does_not_inherit_the_models_compiled_call():
    """transformers caches a torch.compile of the model's own __call__ on it; a twin calling that would run the
    model's weights, not its own."""
    model = llama()
    model._compiled_call, model._last_compile_config = model.__call__, object()
    twin = hookless_twin(model, set())
    assert "_compiled_call" not in twin.__dict__ and "_last_compile_config" not in twin.__dict__


def test_autocast_dtype_says_what_autocast_runs_matmuls_in():
    assert autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=BF16):
        assert autocast_dtype("cpu") == BF16
        with torch.autocast("cpu", enabled=False):
            assert autocast_dtype("cpu") is None


def test_autocast_weights_holds_each_linears_cast_in_the_same_storage_at_every_generation():
    model = llama()
    keys, weights = list(model.state_dict()), {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        expected = model(input_ids=IDS).logits
        with autocast_weights(model, BF16) as twin:
            assert twin is not model
            assert all(t.weight.dtype == BF16 for t in linears(twin))
            assert all(m.weight.dtype == torch.float32 for m in linears(model))
            assert twin.model.embed_tokens.weight is model.model.embed_tokens.weight  # only Linears are cast
            assert twin.model.norm.weight is model.model.norm.weight
            got = twin(input_ids=IDS).logits
            addresses = [t.weight.data_ptr() for t in linears(twin)]
    assert torch.equal(got, expected)  # what autocast computes from the fp32 weights, to the bit
    assert list(model.state_dict()) == keys and len(list(model.modules())) == len(list(twin.modules()))
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # the model as it was
    with torch.no_grad():
        model.lm_head.weight.mul_(-2.0)  # a training step
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        expected = model(input_ids=IDS).logits
        with autocast_weights(model, BF16) as again:
            assert again is twin and [t.weight.data_ptr() for t in linears(twin)] == addresses
            assert torch.equal(again(input_ids=IDS).logits, expected)  # the new weights' casts, in place


def test_autocast_weights_to_another_precision_lets_the_old_casts_go():
    import gc
    import weakref

    model = llama()
    with autocast_weights(model, BF16) as bf16:
        pass
    old = weakref.ref(bf16)
    del bf16
    with autocast_weights(model, torch.float16) as fp16:
        assert all(t.weight.dtype == torch.float16 for t in linears(fp16))
    gc.collect()
    assert old() is None


def test_autocast_weights_leaves_the_model_where_there_is_nothing_to_cast():
    """No autocast, fp32 autocast, bf16 weights, or frozen fp32 ones (autocast keeps no cast of those either)."""
    model = llama()
    with autocast_weights(model, None) as sampler:
        assert sampler is model
    with autocast_weights(model, torch.float32) as sampler:
        assert sampler is model
    half = llama().to(BF16)
    with autocast_weights(half, BF16) as sampler:
        assert sampler is half
    frozen = llama().requires_grad_(False)
    with autocast_weights(frozen, BF16) as sampler:
        assert sampler is frozen


@pytest.mark.parametrize("kind", ["tied", "lora"])
def test_autocast_weights_keeps_tied_embeddings_and_lora_adapters_exact(kind):
    """Tied embeddings: the lm_head's cast is the twin's, the lookup keeps the fp32 table. LoRA: both adapter
    matrices cast, the frozen base weights left to autocast (which casts them at every call and keeps nothing), the
    adapter's scaling and sum as PEFT computes them."""
    from omegaconf import OmegaConf

    from tidpo_cli.modeling import add_lora

    model = llama(tie_word_embeddings=True)
    if kind == "tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        lora = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
        model = add_lora(model, lora).get_base_model().eval()
        with torch.no_grad():
            for m in model.modules():  # PEFT starts lora_B at zero: make the adapter count
                if hasattr(m, "lora_B"):
                    m.lora_B["default"].weight.normal_()
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        expected = model(input_ids=IDS).logits
        with autocast_weights(model, BF16) as twin:
            got = twin(input_ids=IDS).logits
            if kind == "tied":
                assert twin.lm_head.weight.dtype == BF16 and twin.model.embed_tokens.weight.dtype == torch.float32
            else:  # autocast caches only trainable weights: the frozen base ones stay as they are (no memory)
                adapters = [t for t, m in zip(linears(twin), linears(model)) if m.weight.requires_grad]
                assert len(adapters) == 8 and all(t.weight.dtype == BF16 for t in adapters)  # 2 layers x q, v x A, B
                assert all(t.weight is m.weight for t, m in zip(linears(twin), linears(model))
                           if not m.weight.requires_grad)
    assert torch.equal(got, expected)


def test_a_compiled_forward_of_the_twin_casts_no_weight():
    """What the twin is for: traced under autocast (AOT, as inductor sees it), the model's forward casts every
    Linear weight to bf16 on every call, since a compiled graph has no autocast cache; the twin's casts only the
    activations, so each Linear's weight cast is gone."""
    def bf16_casts(module):
        counts = []

        def count(graph_module, example_inputs):
            counts.append(sum(n.op == "call_function" and "_to_copy" in str(n.target)
                              and n.kwargs.get("dtype") == BF16 for n in graph_module.graph.nodes))
            return graph_module

        torch._dynamo.reset()
        with torch.no_grad():
            logits = torch.compile(module, backend=aot_autograd(fw_compiler=count))(input_ids=IDS).logits
        return sum(counts), logits

    model = llama()
    with torch.autocast("cpu", dtype=BF16):
        plain, expected = bf16_casts(model)
        with autocast_weights(model, BF16) as twin:
            cast_once, got = bf16_casts(twin)
    torch._dynamo.reset()
    assert plain - cast_once == len(linears(model)) == 15  # 2 layers x 7 projections, and the lm_head
    assert torch.equal(got, expected)
