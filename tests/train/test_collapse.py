"""The router-collapse warning: one expert over the threshold of token copies for
``patience`` steps warns once per layer; a layer with a single expert (the dense baseline)
never does, nor top-2 over two experts (each takes half of the copies)."""

import torch

from moe.train.faults import CollapseDetector


def test_collapse_warns_once_after_patience_and_never_for_one_expert():
    detector = CollapseDetector(threshold=0.9, patience=3)
    collapsed, balanced, single = torch.tensor([95, 5]), torch.tensor([50, 50]), torch.tensor([100])
    messages = [detector.update([collapsed, balanced, single], 100, step) for step in range(1, 6)]
    assert [len(m) for m in messages] == [0, 0, 1, 0, 0]
    assert "MoE layer 0: expert 0" in messages[2][0]
    both = torch.tensor([100, 100])  # top-2 of 2 experts: 100 tokens, 200 copies
    assert all(not detector.update([balanced, balanced, single, both], 200, s) for s in range(9))
