"""The dispatch plan (kernels/dispatch_plan.py): grouping, counts, capacity rules."""

import pytest
import torch
from moe.kernels import count_per_slot, expert_capacity, plan_dispatch

from tests.reference import generator, kept_copies


def random_choices(T, K, E, g):
    """Distinct experts per token, as top-k gives."""
    return torch.stack(
        [torch.randperm(E, generator=g)[:K] for _ in range(T)]
        or [torch.zeros(0, K, dtype=torch.long)]
    ).reshape(T, K)


def kept_from_plan(plan):
    T, K = plan.pos_TK.shape
    return {(t, k) for t in range(T) for k in range(K) if plan.pos_TK[t, k] >= 0}


def test_capacity_keeps_copies_in_sequence_order():
    ids = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1], [2, 0]])
    plan = plan_dispatch(ids, num_experts=3, capacity=2)
    # First choices in token order, then second choices: expert 0 fills with t0, t1;
    # expert 1 with t2 (k=0), t0 (k=1); expert 2 with t4 (k=0), t1 (k=1).
    assert kept_from_plan(plan) == {(0, 0), (1, 0), (2, 0), (4, 0), (0, 1), (1, 1)}
    assert plan.counts_E.tolist() == [2, 2, 2]
    assert plan.routed_E.tolist() == [5, 3, 2]
    assert plan.row_token_N.tolist()[:6] == [0, 1, 2, 0, 4, 1]
    # The four dropped copies follow the kept rows, so the buffer is always T*K rows.
    assert plan.num_rows == 10 and plan.offsets_E[-1].item() == 6
    assert sorted(plan.row_copy_N.tolist()[6:]) == [5, 6, 7, 9]  # (2,1), (3,0), (3,1), (4,1)


def test_capacity_gate_priority_keeps_highest_gates():
    ids = torch.tensor([[0], [0], [0], [1]])
    gates = torch.tensor([[0.2], [0.9], [0.5], [0.3]])
    plan = plan_dispatch(ids, num_experts=2, capacity=2, gates_TK=gates, priority="gate")
    assert kept_from_plan(plan) == {(1, 0), (2, 0), (3, 0)}
    assert plan.row_token_N.tolist()[:3] == [1, 2, 3]  # highest gate first within expert 0
    assert plan.row_token_N.tolist()[3:] == [0]  # the dropped copy, behind the kept ones


@pytest.mark.parametrize("priority", ["sequence", "gate"])
@pytest.mark.parametrize("T,K,E,cap", [(40, 1, 4, 7), (33, 2, 5, 9), (21, 4, 6, 10), (5, 2, 8, 1)])
def test_plan_matches_reference_capacity_rule(priority, T, K, E, cap):
    g = generator(T * 100 + K)
    ids = random_choices(T, K, E, g)
    gates = torch.rand(T, K, generator=g)
    plan = plan_dispatch(ids, E, cap, gates, priority)
    assert kept_from_plan(plan) == kept_copies(ids, gates, E, cap, priority)
    # Rows are grouped by expert in ascending order and the offsets describe the groups.
    kept = plan.offsets_E[-1].item()
    assert kept == plan.counts_E.sum().item() == len(kept_from_plan(plan))
    experts_of_rows = ids.reshape(-1)[plan.row_copy_N[:kept]]
    assert torch.equal(experts_of_rows, torch.sort(experts_of_rows).values)
    assert (plan.counts_E <= cap).all()
    # Every copy has one row (T*K of them): kept rows know their position, dropped ones -1.
    assert plan.num_rows == T * K and sorted(plan.row_copy_N.tolist()) == list(range(T * K))
    assert torch.equal(plan.pos_TK.reshape(-1)[plan.row_copy_N[:kept]], torch.arange(kept))
    assert (plan.pos_TK.reshape(-1)[plan.row_copy_N[kept:]] == -1).all()


@pytest.mark.parametrize("T,K,E,cap,parts", [(40, 2, 4, 9, 4), (33, 3, 5, 7, 3), (12, 1, 3, 2, 2)])
def test_parts_of_a_batch_keep_what_the_whole_batch_keeps(T, K, E, cap, parts):
    """Expert parallelism splits a batch over ranks: each part, told how many copies of the
    other parts come first (``ahead_KE``), keeps exactly its share of the whole batch's."""
    g = generator(T * 7 + K)
    ids = random_choices(T, K, E, g)
    whole = kept_copies(ids, None, E, cap, "sequence")
    size = T // parts
    chunks = [ids[i * size : (i + 1) * size] for i in range(parts)]
    counts = torch.stack([count_per_slot(c, E) for c in chunks])  # [part, K, E]
    total = counts.sum(0)
    for i, chunk in enumerate(chunks):
        ahead = torch.cumsum(total, 0) - total + counts[:i].sum(0)
        plan = plan_dispatch(chunk, E, cap, priority="sequence", ahead_KE=ahead)
        expected = {(t - i * size, k) for t, k in whole if i * size <= t < (i + 1) * size}
        assert kept_from_plan(plan) == expected
        assert plan.counts_E.sum().item() == len(expected) == plan.offsets_E[-1].item()


def test_dropless_keeps_everything_and_capacity_formula():
    ids = torch.randint(0, 4, (50, 2))
    plan = plan_dispatch(ids, 4)
    assert plan.num_rows == 100 and (plan.pos_TK >= 0).all()
    assert expert_capacity(1.25, 50, 2, 4) == 32  # ceil(1.25 * 100 / 4)
    assert expert_capacity(0.0, 50, 2, 4) == 100


def test_zero_tokens_plan():
    plan = plan_dispatch(torch.zeros(0, 2, dtype=torch.long), 3, capacity=4)
    assert plan.num_rows == 0 and plan.offsets_E.tolist() == [0, 0, 0]
