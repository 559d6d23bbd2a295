"""transformers' Trainer and the penalty: one optimizer step weighs the recipe's penalty once,
whatever the gradient accumulation and the number of processes; a loss computed outside the
model (label smoothing) says the penalty was not collected; a run shorter than the schedule
says so before training."""
from __future__ import annotations

import gc
import os
import tempfile
import warnings

import pytest
import torch

from hf_harness import cov  # noqa: F401  (skips the module, with the reason printed, without transformers)

import sparsify
from spawned import spawn
from sparsify.integrations import huggingface as hf

pytest.importorskip("accelerate", reason="the Trainer needs accelerate (pip install fx-sparsify[integrations])")

from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          Trainer, TrainingArguments)

# recipe -> how close an accumulated step comes to the whole batch's: the means of tl1 and l1
# over equal micro-batches average to the whole batch's; a batch's Hoyer square is not the mean
# of its parts' (its ratio of sums is taken per micro-batch, as a smaller batch would)
PENALTY_RECIPES = {"tl1": 1e-5, "activation-l1": 1e-5, "activation-hoyer": 1e-2}


def gpt2(recipe, total_steps=10):
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                   resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    return sparsify.sparsify(m, recipe, total_steps=total_steps)


def bert(recipe):
    torch.manual_seed(0)
    m = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=3, max_position_embeddings=16, hidden_dropout_prob=0, attention_probs_dropout_prob=0))
    return sparsify.sparsify(m, recipe, total_steps=10)


def token_data(n=8, causal=True):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(0, 50, (8,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long),
                     "labels": ids.clone() if causal else i % 3})
    return rows


def one_step(model, data, *, accumulate, batch, callbacks=None, max_steps=1, **kw):
    """The change of every parameter after one plain-SGD optimizer step (lr 1) of the Trainer."""
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=max_steps, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulate, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", learning_rate=1.0, lr_scheduler_type="constant", optim="sgd",
                             weight_decay=0.0, max_grad_norm=0, seed=0, dataloader_num_workers=0, **kw)
    callbacks = [hf.SparsifyTrainerCallback()] if callbacks is None else callbacks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    return {k: v.detach() - before[k] for k, v in model.named_parameters()}


def rel_diff(a, b):
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    return num / sum(float(a[k].norm() ** 2) for k in a) ** 0.5


@pytest.mark.parametrize("recipe", PENALTY_RECIPES)
def test_accumulated_step_equals_the_whole_batch_step(recipe, monkeypatch):
    """GPT-2 takes loss kwargs: the Trainer normalizes its loss over the accumulated batch and
    does not divide it, so a penalty added at full weight to each of 4 micro-batches counted 4
    times (the update differed from the whole batch's by 5% with tl1)."""
    whole = one_step(gpt2(recipe), token_data(), accumulate=1, batch=8)
    accumulated = one_step(gpt2(recipe), token_data(), accumulate=4, batch=2)
    assert rel_diff(whole, accumulated) < PENALTY_RECIPES[recipe]
    monkeypatch.setattr(hf, "penalty_share", lambda kwargs, **weights: None)  # the penalty at full weight each time
    assert rel_diff(whole, one_step(gpt2(recipe), token_data(), accumulate=4, batch=2)) > 10 * PENALTY_RECIPES[recipe]


def modernbert_mlm():
    from transformers import ModernBertConfig, ModernBertForMaskedLM
    torch.manual_seed(0)
    m = ModernBertForMaskedLM(ModernBertConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
        embedding_dropout=0.0, mlp_dropout=0.0, attention_dropout=0.0))
    return sparsify.sparsify(m, "tl1", total_steps=10)


def test_the_penalty_of_micro_batches_with_unequal_label_counts_adds_up_to_the_whole_batch():
    """Masked LM: the micro-batches of 2 carry 0, 10, 4 and 16 labels. The penalty (a mean over
    activation elements) used to be weighed by the micro-batch's share of the labels: the first
    got weight 0 and the penalty's part of the update differed from the whole batch's by 30%.
    Each micro-batch now weighs its share of the step's samples (1/4 here)."""
    g = torch.Generator().manual_seed(1)
    data = []
    for n in [0, 0, 2, 8, 1, 3, 8, 8]:
        ids = torch.randint(3, 50, (12,), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:n] = ids[:n]
        data.append({"input_ids": ids, "labels": labels})

    def penalty_update(batch, accumulate):  # the step with the callback minus the step of the loss alone
        with_penalty = one_step(modernbert_mlm(), data, accumulate=accumulate, batch=batch)
        without = one_step(modernbert_mlm(), data, accumulate=accumulate, batch=batch, callbacks=[])
        return {k: v - without[k] for k, v in with_penalty.items()}

    whole, accumulated = penalty_update(8, 1), penalty_update(2, 4)
    assert sum(float(v.norm()) for v in whole.values()) > 0
    assert rel_diff(whole, accumulated) < 1e-4


def test_a_head_that_drops_num_items_is_exact_with_accepts_loss_kwargs_false():
    """BertForSequenceClassification takes **kwargs but its loss ignores num_items_in_batch
    (transformers issue #47688): the Trainer then accumulates 4 unscaled micro-batch means. The
    documented way out, ``model.accepts_loss_kwargs = False``, makes the Trainer divide the loss
    and the penalty by the micro-batch count: the step equals the whole batch's."""
    whole = one_step(bert("tl1"), token_data(causal=False), accumulate=1, batch=8)
    model = bert("tl1")
    model.accepts_loss_kwargs = False
    assert rel_diff(whole, one_step(model, token_data(causal=False), accumulate=4, batch=2)) < 1e-5


def test_the_share_is_the_micro_batch_share_of_the_step_whatever_the_labels():
    """A micro-batch's penalty weight is 1 over the micro-batches of its optimizer step (fewer in
    an epoch's last step, by the Trainer's rule), over the Trainer's multiplication by the number
    of processes; its labels do not count (they weighed it before: all -100 gave 0)."""
    from types import SimpleNamespace
    none = {"labels": torch.full((2, 4), -100), "num_items_in_batch": torch.tensor(6)}
    assert hf.penalty_share(none, micro_batches=4) == 0.25
    assert hf.penalty_share(none, micro_batches=4, loss_scale=2) == 0.125
    assert hf.penalty_share({"labels": none["labels"]}, micro_batches=4) is None  # the Trainer divides it
    args = SimpleNamespace(gradient_accumulation_steps=4)
    # 10 micro-batches an epoch: steps of 4, 4 and 2, in every epoch; no length: always 4
    steps = [hf._micro_batches(args, SimpleNamespace(global_step=s), range(10)) for s in range(7)]
    assert steps == [4, 4, 2, 4, 4, 2, 4]
    assert hf._micro_batches(args, SimpleNamespace(global_step=2), iter(range(10))) == 4
    averaging = SimpleNamespace(average_tokens_across_devices=True, n_gpu=1, world_size=2)
    assert hf._loss_scale(averaging, gpt2("tl1")) == 2
    assert hf._loss_scale(SimpleNamespace(**{**vars(averaging), "average_tokens_across_devices": False}), None) == 1


def test_the_last_short_step_of_an_epoch_weighs_its_penalty_once(monkeypatch):
    """10 equal samples, micro-batches of 2, 4 accumulated: the epoch's second step holds one
    micro-batch, which the Trainer does not divide, so its penalty weighs 1 there. The two steps
    then equal two steps on batches of 2 of the same sample."""
    data = token_data(1) * 10
    reference = one_step(gpt2("tl1"), data[:4], accumulate=1, batch=2, max_steps=2)
    assert rel_diff(reference, one_step(gpt2("tl1"), data, accumulate=4, batch=2, max_steps=2)) < 1e-5
    monkeypatch.setattr(hf, "_micro_batches", lambda args, state, loader: args.gradient_accumulation_steps)
    assert rel_diff(reference, one_step(gpt2("tl1"), data, accumulate=4, batch=2, max_steps=2)) > 1e-4


def test_a_tuple_output_gets_the_penalty_in_its_loss():
    """return_dict=False: the loss is the tuple's first element (the Trainer reads it there)."""
    model = gpt2("tl1").train()
    ids = torch.randint(0, 50, (2, 8))
    plain = model(input_ids=ids, labels=ids, return_dict=False)[0]
    sparsify.penalty(model)  # forget this forward's terms
    handle = model.register_forward_hook(hf._add_penalty, with_kwargs=True)
    try:
        out = model(input_ids=ids, labels=ids, return_dict=False)
    finally:
        handle.remove()
    assert isinstance(out, tuple) and float(out[0]) > float(plain) + 1e-4


def test_label_smoothing_leaves_the_penalty_uncollected_and_says_so():
    """With label_smoothing_factor the Trainer computes the loss outside the model and the model
    returns none: the callback used to read (and so forget) the penalty without adding it
    anywhere; now the terms stay recorded and sparsify.step warns that nothing collected them."""
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", logging_strategy="no", label_smoothing_factor=0.1,
                             dataloader_num_workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(model=gpt2("tl1"), args=args, train_dataset=token_data(),
                callbacks=[hf.SparsifyTrainerCallback()]).train()
    assert any("never collected" in str(w.message) for w in caught)


def test_a_run_shorter_than_the_schedule_is_told_before_training():
    model = gpt2("gmp", total_steps=100)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", logging_strategy="no", dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=token_data(), callbacks=[hf.SparsifyTrainerCallback()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in caught if "the run takes 2 optimizer steps" in str(w.message)]
    assert len(said) == 1 and "total_steps=2" in said[0] and "total_steps=100" in said[0]


def _ddp_worker(rank, port, out, recipe):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    delta = one_step(gpt2(recipe), token_data(), accumulate=2, batch=2, ddp_backend="gloo")
    torch.save(delta, os.path.join(out, f"rank{rank}.pt"))
    gc.collect()  # the Trainer's models (cyclic garbage) and the group they hold go while Python is alive
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("recipe", ["tl1"])
def test_two_processes_accumulating_equal_the_whole_batch(tmp_path, recipe):
    """2 processes x 2 micro-batches of 2: the Trainer averages the item count across processes
    and multiplies each process's loss by 2 before DDP averages the gradients; the penalty's
    share makes the step equal one process's step on the whole batch of 8."""
    spawn(_ddp_worker, str(tmp_path), recipe, nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    whole = one_step(gpt2(recipe), token_data(), accumulate=1, batch=8)
    assert rel_diff(ranks[0], ranks[1]) == 0
    assert rel_diff(whole, ranks[0]) < 1e-5


def test_the_step_gets_the_training_loss():
    """sparsify.step ran without the loss under the Trainer: semi-structured, which keeps the
    mask map of the lowest training loss, froze a random draw (best loss inf) and told the user
    to pass a loss they cannot pass; now the callback gives each step its micro-batches' loss."""
    from torch import nn
    from torch.nn import functional as F

    from sparsify.core.state import find_state

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 10)

        def forward(self, pixel_values, labels=None):
            logits = self.fc(F.relu(self.c2(F.relu(self.c1(pixel_values)))).mean((2, 3)))
            return {"logits": logits} if labels is None else {"logits": logits, "loss": F.cross_entropy(logits, labels)}

    torch.manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 10} for i in range(40)]
    model = sparsify.sparsify(CNN(), "semi-structured", total_steps=10, example_inputs=(torch.randn(1, 3, 16, 16),))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=10, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", dataloader_num_workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(model=model, args=args, train_dataset=data, callbacks=[hf.SparsifyTrainerCallback()]).train()
    group = find_state(model).groups["rule0_semi_structured"]
    assert bool(group.frozen) and 0 < float(group.best_loss) < 10
    assert not [w for w in caught if "got no loss" in str(w.message)]
