"""gnsp_optim.boundary, standalone: NestedTensor rows, running-stat freezing, refusals, Conv1D, weak hooks."""

from __future__ import annotations

import copy
import gc
import importlib.util
import io
import warnings
import weakref

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gnsp_optim.boundary import (
    RunningStatsFreeze,
    WeakHook,
    check_no_dora,
    check_not_meta,
    conv1d_read,
    conv1d_write,
    input_rows,
    is_hf_conv1d,
    release_with,
    running_stat_layers,
)

HAS_TF = importlib.util.find_spec("transformers") is not None
HAS_PEFT = HAS_TF and importlib.util.find_spec("peft") is not None
pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")


# ------------------------------------------------------------------------------------ NestedTensor rows
@given(lengths=st.lists(st.integers(0, 5), min_size=1, max_size=4), d=st.integers(1, 4), seed=st.integers(0, 99))
def test_input_rows_of_a_nested_tensor_are_the_real_positions(lengths, d, seed):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, d, generator=g) for n in lengths]
    rows = input_rows(torch.nested.nested_tensor(parts), d)
    expected = torch.cat(parts) if parts else torch.zeros(0, d)  # the obvious version
    assert torch.equal(rows, expected)


def test_transformer_encoder_fast_path_rows_equal_the_slow_path_at_real_positions():
    """What a hook sees on the NestedTensor fast path equals the dense path's rows at unpadded positions."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1,
                                enable_nested_tensor=True).double().eval()
    mha = enc.layers[0].self_attn
    seen: list[torch.Tensor] = []
    h = mha.register_forward_hook(lambda m, a, kw, o: seen.append(input_rows(a[0], 8)), with_kwargs=True)
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    mask = torch.tensor([[False] * 4, [False, False, True, True]])
    with torch.no_grad():
        enc(x, src_key_padding_mask=mask)  # fast path: NestedTensor
    assert seen[-1].shape == (6, 8)
    enc(x, src_key_padding_mask=mask)  # grad enabled: the dense path, padded positions included
    dense = seen[-1].reshape(2, 4, 8)
    h.remove()
    assert torch.allclose(seen[0], dense[~mask], atol=1e-12)


# ------------------------------------------------------------------------------------ running statistics
class ConvBN(nn.Module):
    def __init__(self, momentum=0.1):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum)
        self.head = nn.Linear(64, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("momentum", [0.1, None])  # None: cumulative average, driven by num_batches_tracked
def test_frozen_running_stats_keep_old_eval_outputs_exact(momentum):
    torch.manual_seed(0)
    model = ConvBN(momentum).double()
    model.train()
    model(torch.randn(8, 3, 6, 6, dtype=torch.float64))  # task 1 moved them once
    keep = RunningStatsFreeze(model)
    assert [n for n, _ in keep.layers] == ["bn"]
    keep.snapshot()
    old = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    model.eval()
    y0 = model(old).detach()
    buffers = {k: b.clone() for k, b in model.bn.named_buffers()}
    model.train()
    twin = copy.deepcopy(model)  # the same forward with no freezing: train-mode outputs must not differ
    keep_twin = RunningStatsFreeze(twin, mode="track")
    with pytest.warns(UserWarning, match="'bn'"):
        keep_twin.snapshot()
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64) * 3 + 1
    out, out_twin = model(x), twin(x)
    assert torch.equal(out, out_twin)  # train mode still normalises by the batch statistics
    out.square().sum().backward()  # the restore must not break batch_norm's backward (it saved the buffers)
    out_twin.square().sum().backward()
    assert torch.equal(model.conv.weight.grad, twin.conv.weight.grad)
    model.eval()
    assert torch.equal(model(old), y0)
    assert all(torch.equal(b, buffers[k]) for k, b in model.bn.named_buffers())
    twin.eval()
    assert not torch.equal(twin(old), y0)  # "track": they moved, and the old outputs with them
    keep.remove()
    model.train()
    model(x)
    assert not torch.equal(model.bn.running_mean, buffers["running_mean"])


def test_running_stats_mode_is_checked_and_layers_found():
    with pytest.raises(ValueError, match="running_stats"):
        RunningStatsFreeze(nn.BatchNorm1d(2), mode="keep")
    m = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2, track_running_stats=False), nn.LayerNorm(2),
                      nn.InstanceNorm1d(2, track_running_stats=True))
    assert [n for n, _ in running_stat_layers(m)] == ["0", "3"]


# ------------------------------------------------------------------------------------ refusals
def test_meta_model_refused_naming_the_tensor():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"parameter '0.weight' is on the meta device"):
        check_not_meta(m)
    check_not_meta(nn.Linear(2, 2))  # a real model passes


@pytest.mark.skipif(not HAS_PEFT, reason="peft not installed")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_dora_refused_lora_accepted():
    import peft
    import transformers as tf

    def model(dora):
        torch.manual_seed(0)
        base = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                                                  num_hidden_layers=1, num_attention_heads=2))
        return peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=dora))

    with pytest.raises(ValueError, match=r"q_proj.*DoRA"):
        check_no_dora(model(True))
    check_no_dora(model(False))


# ------------------------------------------------------------------------------------ transformers Conv1D
@pytest.mark.skipif(not HAS_TF, reason="transformers not installed")
def test_conv1d_reads_as_a_transposed_linear_and_projects_exactly():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(5, 6).double()  # nf=5 outputs, nx=6 inputs: weight (6, 5)
    with torch.no_grad():
        conv.bias.normal_()
    assert is_hf_conv1d(conv) and not is_hf_conv1d(nn.Linear(6, 5))
    old = torch.randn(3, 2, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)[:, :6]
    old = old[..., :6] * torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.float64)  # rank 3 inputs
    wm, bm = conv1d_read(conv.weight, conv.bias)
    assert torch.allclose(torch.nn.functional.linear(old, wm[0], bm[0, :, 0]), conv(old), atol=1e-13)
    assert wm.untyped_storage().data_ptr() == conv.weight.untyped_storage().data_ptr()  # a view
    # null space of the augmented inputs [x | 1]: the obvious eigh, rho = 0
    xa = torch.cat([old.reshape(-1, 6), torch.ones(6, 1, dtype=torch.float64)], 1)
    lam, vec = torch.linalg.eigh(xa.T @ xa)
    null = vec[:, lam < 1e-10 * lam.max()]
    assert null.shape[1] == 3
    y0 = conv(old).detach()
    dw, db = torch.randn(6, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    dwm, dbm = conv1d_read(dw, db)
    full = torch.cat([dwm, dbm], 2) @ (null @ null.T)  # project [dW^T | db] on the input side
    conv1d_write(dw, db, full[:, :, :6], full[:, :, 6:])
    with torch.no_grad():
        conv.weight += dw
        conv.bias += db
    assert ((conv(old) - y0).norm() / y0.norm()).item() < 1e-12
    assert dw.abs().max() > 1e-3  # it did move


# ------------------------------------------------------------------------------------ weak hooks
class Recorder:
    def __init__(self):
        self.rows = 0

    def record(self, mod, args, kwargs, out):
        self.rows += args[0].shape[0]


def test_weak_hook_copy_never_feeds_the_original_and_save_works():
    lin, rec = nn.Linear(3, 2), Recorder()
    lin.register_forward_hook(WeakHook(rec, "record", lin), with_kwargs=True)
    lin(torch.randn(4, 3))
    twin = copy.deepcopy(lin)
    twin(torch.randn(7, 3))
    assert rec.rows == 4
    buf = io.BytesIO()
    torch.save(lin, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    loaded(torch.randn(5, 3))  # inert hook
    assert rec.rows == 4


def test_weak_hook_does_not_keep_its_owner_alive_and_release_removes():
    lin = nn.Linear(3, 2)
    rec = Recorder()
    handle = lin.register_forward_hook(WeakHook(rec, "record", lin), with_kwargs=True)
    release_with(rec, [handle])
    ref = weakref.ref(rec)
    del rec
    gc.collect()
    assert ref() is None
    assert len(lin._forward_hooks) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lin(torch.randn(2, 3))
