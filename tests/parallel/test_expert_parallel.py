"""Expert parallelism on the CPU with gloo: N processes against one process.

Every worker builds the same model from the same seed, keeps its experts, trains on its
share of each global batch, and the results are compared with one process training on the
whole global batch.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from moe.layers import MoEConfig, MoELayer, is_expert_param
from moe.model import MoETransformer
from moe.parallel import ParallelLayout, clip_grad_norm_, parallelize_experts, sync_gradients
from tests.reference import on_cpu
from tests.small_model import small_model_config

STEPS, GLOBAL_BATCH, SEQ = 20, 8, 16


def batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 64, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def train(model, step_fn, shard=slice(None)):
    """``shard``: this rank's rows of every global batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    losses = []
    for ids in batches():
        ids = ids[shard]
        out = model(ids[:, :-1])
        ce = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        loss = ce + 0.01 * out.aux_loss + 0.001 * out.z_loss
        loss.backward()
        losses.append(step_fn(loss))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def model_config(capacity_factor=0.0):
    moe = {"num_experts": 4, "top_k": 2, "d_ff": 16, "capacity_factor": capacity_factor}
    return small_model_config(vocab_size=64, n_layers=2, d_ff=32, moe=moe)


def single_process(capacity_factor=0.0):
    torch.manual_seed(0)
    model = MoETransformer(model_config(capacity_factor))

    def step(loss):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        return loss.item()

    return train(model, step), model.state_dict()


def _init(rank, world, store):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _train_worker(rank, world, ep, store, out, capacity_factor):
    _init(rank, world, store)
    torch.manual_seed(0)
    model = MoETransformer(model_config(capacity_factor))
    layout = ParallelLayout.create(ep)
    parallelize_experts(model, layout)
    share = GLOBAL_BATCH // world

    def step(loss):
        sync_gradients(model, layout)
        clip_grad_norm_(model, layout, 1.0)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        return (mean / world).item()

    losses = train(model, step, slice(rank * share, (rank + 1) * share))
    state = {}
    for name, tensor in model.state_dict().items():
        if is_expert_param(name):
            parts = [torch.empty_like(tensor) for _ in range(ep)]
            dist.all_gather(parts, tensor, group=layout.ep_group)
            tensor = torch.cat(parts)
        state[name] = tensor
    if rank == 0:
        torch.save({"losses": losses, "state": state}, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "world, ep, capacity_factor",
    [(2, 2, 0.0), (4, 4, 0.0), (4, 2, 0.0), (4, 2, 1.0)],
    ids=["ep2", "ep4", "dp2xep2", "dp2xep2_capacity"],
)
@on_cpu  # the workers run gloo on the CPU; the reference must live there too
def test_expert_parallel_training_matches_one_process(tmp_path, world, ep, capacity_factor):
    out = tmp_path / "result.pt"
    args = (world, ep, str(tmp_path / "store"), str(out), capacity_factor)
    mp.spawn(_train_worker, args=args, nprocs=world)
    result = torch.load(out)
    losses, state = single_process(capacity_factor)
    if capacity_factor > 0:  # copies are dropped, and must be the same ones as in one process
        torch.manual_seed(0)
        first = MoETransformer(model_config(capacity_factor))(batches()[0][:, :-1])
        assert all(a.dropped_fraction > 0 for a in first.moe)
    # float32 sums in a different order (per-rank partial sums, all-reduce) drift by a few
    # ulps per step; AdamW's normalised updates keep that at the 1e-5 level over 20 steps.
    torch.testing.assert_close(
        torch.tensor(result["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-5
    )
    for name, tensor in state.items():
        torch.testing.assert_close(
            result["state"][name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def layer_config(mode):
    # capacity: 1.0 x 20 tokens x 2 / 4 = 10 per expert, over both ranks' tokens together
    return MoEConfig(num_experts=4, top_k=2, d_ff=6, capacity_factor=float(mode == "capacity"))


def _dispatch_worker(rank, world, store, out, mode):
    _init(rank, world, store)
    starve = mode == "starve"
    torch.manual_seed(0)
    layer = MoELayer(8, layer_config(mode)).double()
    if starve:  # experts 2 and 3 (rank 1's) are never chosen: rank 1 receives no tokens
        with torch.no_grad():
            layer.router.weight_ED[2:] = 0
            layer.router.weight_ED[:2] = 0
            layer.router.weight_ED[0, 0] = 1.0
    layout = ParallelLayout.create(world)
    parallelize_experts(layer, layout)
    g = torch.Generator().manual_seed(3)
    x_all = torch.randn(world * 5, 8, dtype=torch.float64, generator=g)
    if starve:
        x_all[:, 0] = x_all[:, 0].abs() + 1
        with torch.no_grad():
            layer.router.weight_ED[1, 0] = 0.5  # expert 1 second, 2 and 3 far behind
    x = x_all[rank * 5 : (rank + 1) * 5].clone().requires_grad_()
    y, aux = layer(x)
    grad = torch.randn(world * 5, 8, dtype=torch.float64, generator=g)[rank * 5 : (rank + 1) * 5]
    (y * grad).sum().backward()
    experts = [layer.experts.w_in_EHD.grad, layer.experts.w_out_EDF.grad]
    gathered = {}
    for name, t in [("y", y.detach()), ("dx", x.grad), ("router", layer.router.weight_ED.grad)]:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        gathered[name] = torch.cat(parts) if name != "router" else sum(parts)
    for i, t in enumerate(experts):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        gathered[f"expert{i}"] = torch.cat(parts)
    for name, t in [("kept", aux.kept_E), ("dropped", aux.dropped_fraction.reshape(1))]:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)  # what every rank reports
        gathered[name] = torch.stack(parts)
    if rank == 0:
        torch.save(gathered, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "mode, world", [("random", 2), ("starve", 2), ("capacity", 2), ("capacity", 4)]
)
@on_cpu
def test_all_to_all_dispatch_matches_local(tmp_path, mode, world):
    """random routing; a rank whose experts get no token; capacity with dropped copies.
    Every rank reports the routing statistics of one process on the whole batch."""
    starve = mode == "starve"
    out = tmp_path / "dispatch.pt"
    mp.spawn(_dispatch_worker, args=(world, str(tmp_path / "store"), str(out), mode), nprocs=world)
    got = torch.load(out)
    torch.manual_seed(0)
    layer = MoELayer(8, layer_config(mode)).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(world * 5, 8, dtype=torch.float64, generator=g)
    if starve:
        with torch.no_grad():
            layer.router.weight_ED.zero_()
            layer.router.weight_ED[0, 0] = 1.0
            layer.router.weight_ED[1, 0] = 0.5
        x[:, 0] = x[:, 0].abs() + 1
    x.requires_grad_()
    y, aux = layer(x)
    if mode == "capacity":  # the comparison means something only if copies were dropped
        assert 0 < aux.dropped_fraction.item() < 1
    torch.testing.assert_close(got["kept"], aux.kept_E.expand(world, -1))
    torch.testing.assert_close(got["dropped"], aux.dropped_fraction.expand(world, 1))
    grad = torch.randn(world * 5, 8, dtype=torch.float64, generator=g)
    (y * grad).sum().backward()
    torch.testing.assert_close(got["y"], y.detach())
    torch.testing.assert_close(got["dx"], x.grad)
    torch.testing.assert_close(got["router"], layer.router.weight_ED.grad)
    torch.testing.assert_close(got["expert0"], layer.experts.w_in_EHD.grad)
    torch.testing.assert_close(got["expert1"], layer.experts.w_out_EDF.grad)
    if starve:  # rank 1's experts (2 and 3) received nothing
        assert aux.kept_E[2:].sum() == 0 and aux.kept_E[:2].sum() == world * 5 * 2
