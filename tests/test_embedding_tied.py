"""Embedding statistic as token counts, and the tied embedding/head projection (float64, public calls)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gnsp_optim.embedding import TokenCountStat, null_projector, project_embedding_, project_tied_


def test_token_counts_equal_the_one_hot_covariance_and_its_null_space_is_the_unused_rows():
    ids = torch.tensor([[1, 3, 3, 0], [5, 1, 1, 7]])
    v = 9
    st_ = TokenCountStat(v)
    st_.update(ids)
    st_.fold()
    onehot = nn.functional.one_hot(ids.reshape(-1), v).double()
    assert torch.equal(st_.gram_reference(), onehot.T @ onehot)  # the obvious V x V statistic
    p = null_projector(onehot)  # rho = 0 null space, the general way
    unused = (~st_.used).double()
    assert torch.allclose(p, torch.diag(unused), atol=1e-12)
    assert st_.used.nonzero().flatten().tolist() == [0, 1, 3, 5, 7]


def test_token_counts_accumulate_over_tasks_and_check_their_input():
    st_ = TokenCountStat(5, padding_idx=4)
    st_.update(torch.tensor([0, 4, 4]))
    assert st_.seen
    st_.fold()
    assert not st_.seen
    st_.update(torch.nested.nested_tensor([torch.tensor([2]), torch.tensor([2, 1])]))
    st_.fold()
    assert st_.memory.tolist() == [1, 1, 2, 0, 2] and st_.tasks_folded == 2  # padding counted too
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        st_.update(torch.tensor([5]))
    with pytest.raises(ValueError, match="rows"):
        project_embedding_(torch.zeros(4, 2), st_.used)


class TiedLM(nn.Module):
    def __init__(self, v=12, d=8, head_bias=False):
        super().__init__()
        self.emb, self.body = nn.Embedding(v, d), nn.Linear(d, d)
        self.head = nn.Linear(d, v, bias=head_bias)
        self.head.weight = self.emb.weight  # tied

    def hidden(self, ids):
        return torch.tanh(self.body(self.emb(ids)))

    def forward(self, ids):
        return self.head(self.hidden(ids))


def _setup(head_bias, seed=0):
    torch.manual_seed(seed)
    model = TiedLM(head_bias=head_bias).double()
    old = torch.tensor([[0, 1, 2, 1], [3, 0, 4, 2]])  # tokens 0..4 used; 5 distinct hidden rows in 8-d
    counts = TokenCountStat(12)
    counts.update(old)
    counts.fold()
    with torch.no_grad():
        h = model.hidden(old)
    return model, old, counts, null_projector(h, with_bias=head_bias)


@pytest.mark.parametrize("head_bias", [False, True])
def test_tied_projection_keeps_both_uses_exact_and_each_alone_does_not(head_bias):
    model, old, counts, p = _setup(head_bias)
    with torch.no_grad():
        y0, e0 = model(old), model.emb(old)
    dw = torch.randn(12, 8, dtype=torch.float64)
    db = torch.randn(12, dtype=torch.float64) if head_bias else None

    def apply(delta, delta_b):
        m = TiedLM(head_bias=head_bias).double()
        m.load_state_dict(model.state_dict())
        with torch.no_grad():
            m.emb.weight += delta
            if delta_b is not None:
                m.head.bias += delta_b
            return (m(old) - y0).norm().item() / y0.norm().item(), (m.emb(old) - e0).norm().item()

    both_w, both_b = project_tied_(dw.clone(), counts.used, p, None if db is None else db.clone())
    drift, emb_drift = apply(both_w, both_b)
    assert drift < 1e-12 and emb_drift == 0.0
    assert both_w.abs().max() > 1e-2  # the unused rows still move
    # the embedding's constraint alone leaves the head's outputs free to move ... (old hidden rows are fixed
    # by it, but the unused rows of W still meet them in the head)
    emb_only = project_embedding_(dw.clone(), counts.used)
    assert apply(emb_only, None if db is None else project_embedding_(db.clone().view(12, 1), counts.used)
                 .view(12))[0] > 1e-3
    # ... and the head's alone moves the embedding rows of old tokens
    head_only = dw @ (p[:8, :8] if head_bias else p)
    assert apply(head_only, None)[1] > 1e-3


@given(v=st.integers(2, 10), d=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_the_two_constraints_commute_and_their_product_is_the_projection_on_both(v, d, seed):
    g = torch.Generator().manual_seed(seed)
    used = torch.rand(v, generator=g) < 0.5
    x = torch.randn(max(1, d - 1), d, generator=g, dtype=torch.float64)
    p = null_projector(x)
    dmask = torch.diag((~used).double())
    delta = torch.randn(v, d, generator=g, dtype=torch.float64)
    assert torch.allclose(dmask @ (delta @ p), (dmask @ delta) @ p, atol=1e-12)  # commute
    out, _ = project_tied_(delta.clone(), used, p)
    assert torch.allclose(out, dmask @ delta @ p, atol=1e-12)
    assert torch.allclose(project_tied_(out.clone(), used, p)[0], out, atol=1e-12)  # idempotent
    assert not used.any() or out[used].abs().max().item() == 0.0  # used rows fixed
    assert (out @ x.T).abs().max().item() < 1e-10  # the head's old inputs see no change
    # self-adjoint in the Frobenius inner product: an orthogonal projection, so the largest allowed update
    other = torch.randn(v, d, generator=g, dtype=torch.float64)
    lhs = (other * project_tied_(delta.clone(), used, p)[0]).sum()
    rhs = (project_tied_(other.clone(), used, p)[0] * delta).sum()
    assert torch.allclose(lhs, rhs, atol=1e-10)


def test_tied_projector_shape_is_checked():
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        project_tied_(torch.zeros(4, 3), torch.zeros(4, dtype=torch.bool), torch.eye(2))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        project_tied_(torch.zeros(4, 3), torch.zeros(4, dtype=torch.bool), torch.eye(3), torch.zeros(4))
