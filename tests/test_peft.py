"""PEFT (LoRA) models: weight methods leave the adapter factors dense and say why (masking
low-rank factors makes nothing sparse), ``"options": {"adapters": "include"}`` sparsifies them,
activation methods work through the adapters, and a merged, unfrozen model is sparse-trained as
any other. A tiny Llama and a torchvision ResNet from configs (no download)."""
from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import torch
import torchvision

import sparsify
from sparsify.prepare.adapters import ADAPTER
from loops import run_steps

if importlib.util.find_spec("peft") is None:
    print("skipping tests/test_peft.py: peft is not installed (pip install fx-sparsify[dev])")
peft = pytest.importorskip("peft", reason="peft is not installed (pip install fx-sparsify[dev])")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

WEIGHT_RECIPES = ["st3", "gmp", "nm-2-4", "str", "dual"]


def lora_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=100, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def lora_resnet():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    return peft.get_peft_model(net, peft.LoraConfig(r=4, target_modules=["layer1.0.conv1", "layer4.1.conv2", "fc"]))


IDS = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def lm_steps(model, n=2) -> list[float]:
    opt = torch.optim.AdamW(sparsify.param_groups(model, 1e-2), lr=1e-2)
    return run_steps(model, opt, [(IDS, IDS)] * n, penalty=True,
                     loss_of=lambda x, y: model(input_ids=x, labels=y).loss)


def adapter_names(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and ".lora_" in n}


@pytest.mark.parametrize("recipe", WEIGHT_RECIPES)
def test_weight_recipes_leave_lora_factors_dense_and_say_why(recipe):
    model = lora_llama()
    names = adapter_names(model)
    assert len(names) == 8  # lora_A and lora_B of q_proj and v_proj in 2 layers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(model, recipe, total_steps=4)
    said = [str(w.message) for w in caught if "PEFT adapters" in str(w.message)]
    assert len(said) == 1 and "8 layer(s)" in said[0] and "merge_and_unload().requires_grad_()" in said[0]
    assert not [str(w.message) for w in caught if "rewrote nothing" in str(w.message)]  # the adapter warning says it
    plan = sparsify.core.state.find_state(m).plan
    assert not [e.name for e in plan.rewritten if e.params]  # base layers frozen, factors adapters (dual's tl1: activations)
    reasons = {e.name: e.reason for e in plan.entries}
    assert all(reasons[n].startswith(ADAPTER) for n in names)
    if recipe != "dual":  # (dual's activation rule rewrites the MLP activations)
        assert "no layer of this model is sparsified" in str(sparsify.report(m))
    trainable = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    losses = lm_steps(m)
    assert all(loss == loss for loss in losses)
    assert all(not torch.equal(p, trainable[n]) for n, p in m.named_parameters() if n.endswith("lora_A.default.weight"))


def test_adapters_include_sparsifies_the_factors():
    data = json.loads(json.dumps(sparsify.load_recipe("st3").data))
    data["options"] = {**data.get("options", {}), "adapters": "include"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the fallbacks of the PEFT wrappers
        m = sparsify.sparsify(lora_llama(), data, total_steps=4, begin=0, end=1)
    # the base layers are frozen by PEFT's design: not "frozen layers left dense" (it was said)
    assert not [w for w in caught if "frozen layer(s)" in str(w.message)]
    assert {e.name for e in sparsify.core.state.find_state(m).plan.rewritten} == adapter_names(m)
    lm_steps(m, 2)
    rows = {r.name: r for r in sparsify.report(m).layers}
    assert all(rows[n].weight_sparsity > 0.5 for n in adapter_names(m) if ".lora_A." in n)


def test_an_activation_recipe_trains_a_lora_model():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sparsify.sparsify(lora_llama(), "tl1", total_steps=4)
    assert not [w for w in caught if "PEFT" in str(w.message)]
    assert len(sparsify.core.state.find_state(m).plan.rewritten) == 2  # the MLP activation of each layer
    out = m(input_ids=IDS, labels=IDS)
    assert float(sparsify.penalty(m).detach()) > 0
    assert lm_steps(m)[0] == pytest.approx(float(out.loss), rel=0.5)


@pytest.mark.parametrize("recipe", ["st3", "nm-2-4"])
def test_a_merged_unfrozen_model_is_sparse_trained(recipe):
    merged = lora_llama().merge_and_unload().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(merged, recipe, total_steps=4, begin=0, **({"end": 1} if recipe == "st3" else {}))
    rewritten = {e.name for e in sparsify.core.state.find_state(m).plan.rewritten}
    assert {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"} <= rewritten
    lm_steps(m, 2)
    final = sparsify.finalize(m, check=False)
    assert float((final.model.layers[0].self_attn.q_proj.weight == 0).float().mean()) >= 0.5


def test_lora_on_a_cnn_leaves_conv_and_linear_factors_dense():
    model = lora_resnet()
    names = adapter_names(model)
    assert len(names) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = sparsify.plan(model, "st3", total_steps=4, example_inputs=torch.zeros(1, 3, 32, 32))
    reasons = {e.name: e.reason for e in p.entries}
    assert all(reasons[n].startswith(ADAPTER) for n in names)
    assert not p.rewritten



@pytest.mark.parametrize("recipe", ["tl1", "st3"])
def test_a_lora_cnn_finalizes(recipe):
    """finalize copied a LoRA ResNet as its inner ResNet (PeftModel's __getattr__ handed deepcopy the
    traced ResNet's __deepcopy__) and failed: "'ResNet' object has no attribute 'sparsify_state'"."""
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(lora_resnet(), recipe, total_steps=2, example_inputs=x[:1])
        run_steps(m, torch.optim.SGD(sparsify.param_groups(m), lr=1e-3), [(x, torch.tensor([0, 1]))] * 2,
                  penalty=True)
        final = sparsify.finalize(m)
    assert type(final).__name__ == "PeftModel" and type(final.base_model).__name__ == "LoraModel"
    m.eval()
    with torch.no_grad():
        assert torch.allclose(final(x), m(x), atol=1e-5)


def test_a_peft_model_takes_keyword_example_inputs():
    """PeftModel.forward(*args, **kwargs): a dict of example inputs was passed as one positional
    argument and failed; it is bound to the base model's parameters, as the call passes them on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_name = sparsify.plan(lora_llama(), "tl1", total_steps=4, example_inputs={"input_ids": IDS})
        in_order = sparsify.plan(lora_llama(), "tl1", total_steps=4, example_inputs=(IDS,))
    assert [e.name for e in by_name.rewritten] == [e.name for e in in_order.rewritten] != []
    assert by_name.input_shapes == in_order.input_shapes == [[2, 12]]


def test_a_lora_wrapper_around_a_traced_model_stays_the_wrapper():
    """sparsify()'s structural copy had the same fault as finalize's: a PeftModel around a
    torch.fx-traced model came back as the inner GraphModule."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.out(torch.relu(self.fc(x)))
    model = peft.get_peft_model(torch.fx.symbolic_trace(Net()), peft.LoraConfig(r=2, target_modules=["fc"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = sparsify.sparsify(model, "tl1", total_steps=2, example_inputs=torch.zeros(1, 8))
    assert type(m).__name__ == "PeftModel"


def test_lora_added_after_sparsify_is_named_and_finalize_of_the_peft_model_says_what_to_do():
    """sparsify-then-LoRA: the step warning blamed timm's reset_classifier and advised to replace the
    layer before sparsify() (LoRA-then-sparsify makes nothing sparse); finalize(peft_model) crashed
    with AttributeError 'sparsify_state' (PEFT forwards getattr, not delattr)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=3, max_position_embeddings=64)
    ids = torch.randint(1, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    model = sparsify.sparsify(transformers.BertForSequenceClassification(cfg), "gmp", total_steps=4,
                              example_inputs={"input_ids": ids[:1]})
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            loss = lora(input_ids=ids, labels=torch.tensor([0, 1, 2, 0])).loss + sparsify.penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sparsify.step(model)
    said = [str(w.message) for w in caught if "replaced" in str(w.message) or "PEFT" in str(w.message)]
    assert len(said) == 1 and "wrapped by PEFT adapters" in said[0] and "merge the adapters" in said[0], said
    assert "reset_classifier" not in said[0] and "before calling sparsify()" not in said[0]
    with pytest.raises(TypeError, match=r"wraps the model sparsify\(\) returned \(at \.base_model\.model\) in PEFT "
                                        r"adapters.*merge the adapters first and sparsify after"):
        sparsify.finalize(lora)
