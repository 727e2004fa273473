"""Bytes communicated per subspace refresh under FSDP2, counted from the collectives issued.

Part 1 (traffic). One transformer block of LLaMA shapes (default LLaMA-1B: d 2048,
ffn 5461, GaLore rank 512) as ``Shard(0)`` DTensors of rank 0 in a ``--world``-rank
run (torch's fake process group, see :func:`measure_traffic`), random fp32 gradients,
one optimizer step per method - the refresh - under
:func:`lrgrad.dtensor.count_collectives` (every collective a ``ShardContext`` issues)
with ``DTensor.full_tensor`` wrapped to record the all-gather fallback. A second step
without refresh measures the per-step traffic (the left side's r x n all-reduce of R),
which is subtracted. Bytes *sent per rank* with ring
algorithms: ``2(W-1)/W · B`` for an all-reduce of B bytes, ``(W-1)/W · B`` for an
all-gather of a B-byte result. Methods (``projector="svd"`` unless noted):

* ``all-gather G``: ``svd_sharded="gather"``, the fallback every projector had;
* ``Gram``: ``svd_sharded="gram"``, the n x n Gram all-reduce (right side; left gathers);
* ``sketch, 1 pass`` (default): ``svd_power_iters=0`` - one n x k all-reduce (k = r + 8);
* ``sketch, 2 passes``: ``svd_power_iters=1``;
* ``online PCA step``: an ``online_pca`` refresh after its first;
* ``DCT (default)``: ``projector="dct"`` - n column scores all-reduced on the right side, the
  seeded sketch on the left (one n x k all-reduce + an m x k gather, k = r + 8);
* ``DCT, gather``: ``dct_sharded="gather"`` - exact left-side scores from the all-gathered G.

Traffic does not depend on the values, so the numbers for all ``--layers`` blocks are one
block's times ``--layers``.

Part 2 (quality). The sketch is one function for one process and for row shards
(``lrgrad.projectors.svd.sketch_basis``; tests/distributed checks they agree to 1e-6),
so its subspace is measured in one process: the energy ``‖G Pᵀ‖²`` (``‖Pᵀ G‖²`` on the
left) it captures over the exact top-r SVD's, on real gradients of a small LLaMA
(``--energy-config``, its GaLore rank, d/4 as at 1B) trained a few AdamW steps on the
Python stdlib bytes, cold (first refresh) and warm (started from the basis of a
gradient ``--energy-gap`` steps earlier), plus synthetic power-law spectra
``σ_i = i^-α`` (a harder case than real gradients). For DCT's left-side sketch: the exact
top-r score energy its selection keeps (every matrix scored as a left side, i.e. along m),
on the same real gradients and on synthetic gradients whose energy sits in a few DCT modes.

    python experiments/bench/bench_comm.py --world 8
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

import torch

LLAMA_1B = {"dim": 2048, "ffn": 5461, "layers": 24, "rank": 512}
METHODS: dict[str, dict[str, Any]] = {
    "all-gather G": {"projector": "svd", "svd_sharded": "gather"},
    "Gram": {"projector": "svd", "svd_sharded": "gram"},
    "sketch, 1 pass (default)": {"projector": "svd"},
    "sketch, 2 passes": {"projector": "svd", "svd_power_iters": 1},
    "online PCA step": {"projector": "online_pca"},
    "DCT (default)": {"projector": "dct"},
    "DCT, gather": {"projector": "dct", "dct_sharded": "gather"},
}
DEFAULT = "sketch, 1 pass (default)"
BASELINE = "all-gather G"


def matrices(dim: int, ffn: int) -> list[tuple[str, int, int]]:
    """(name, m, n) of one block's projected weights (nn.Linear: out x in)."""
    return [("q_proj", dim, dim), ("k_proj", dim, dim), ("v_proj", dim, dim), ("o_proj", dim, dim),
            ("gate_proj", ffn, dim), ("up_proj", ffn, dim), ("down_proj", dim, ffn)]


# ---------------------------------------------------------------------------- part 1: traffic
@contextlib.contextmanager
def recorded_gathers(log: list[dict[str, Any]], world: int):
    """Record ``DTensor.full_tensor`` (the all-gather fallback) like ``count_collectives`` does."""
    from torch.distributed.tensor import DTensor

    original = DTensor.full_tensor

    def recording(self, *args, **kwargs):
        if self.dim() >= 2:
            nbytes = self.numel() * self.element_size()
            log.append({"op": "all_gather", "numel": self.numel(), "bytes": nbytes, "world": world,
                        "sent": (world - 1) / world * nbytes})
        return original(self, *args, **kwargs)

    DTensor.full_tensor = recording
    try:
        yield
    finally:
        DTensor.full_tensor = original


def measure_traffic(world: int, dim: int, ffn: int, r: int) -> dict[str, dict[str, float]]:
    """Rank 0's bytes per refresh in a ``world``-rank run, per method and matrix.

    Runs in this process as rank 0 of torch's fake process group (collectives are issued with
    their real shapes but move nothing), so LLaMA-1B shapes fit a laptop: the refresh is SPMD -
    every rank issues the same collectives - so rank 0's log is every rank's. The
    tests (tests/distributed) check the same counts on 2 real gloo processes.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import lrgrad
    from lrgrad.dtensor import count_collectives

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    results: dict[str, dict[str, float]] = {}
    try:
        for method, options in METHODS.items():
            options = dict(options)
            projector = options.pop("projector")
            per_matrix: dict[str, float] = {}
            for name, m, n in matrices(dim, ffn):
                torch.manual_seed(0)
                param = torch.nn.Parameter(distribute_tensor(torch.zeros(m, n), mesh, [Shard(0)]))
                if method == BASELINE:  # the fallback's collective, without its exact SVD's compute
                    log: list[dict[str, Any]] = []
                    with recorded_gathers(log, world):
                        distribute_tensor(torch.randn(m, n), mesh, [Shard(0)]).full_tensor()
                    per_matrix[name] = sum(e["sent"] for e in log)
                    continue
                opt = lrgrad.LowRankOptimizer([param], lr=1e-3, rank=r, update_proj_gap=2, projector=projector,
                                              **options)
                sent = []
                steps = 3 if projector == "online_pca" else 2  # online PCA: its first refresh is a sketch
                for _ in range(steps):
                    param.grad = distribute_tensor(torch.randn(m, n), mesh, [Shard(0)])
                    log = []
                    with count_collectives() as issued, recorded_gathers(log, world):
                        opt.step()
                    sent.append(sum(e["sent"] for e in issued + log))
                # a refresh step minus a plain step (online PCA refreshes every gap: steps 1 and 3)
                per_matrix[name] = (sent[2] if projector == "online_pca" else sent[0]) - sent[1]
            results[method] = per_matrix
    finally:
        dist.destroy_process_group()
    return results


def traffic_table(traffic: dict[str, dict[str, float]], dim: int, ffn: int, layers: int, world: int,
                  rank: int) -> str:
    mib = 2**20
    names = [name for name, _, _ in matrices(dim, ffn)]
    shapes = {name: (m, n) for name, m, n in matrices(dim, ffn)}
    shown = ["q_proj", "gate_proj", "down_proj"]  # q/k/v/o share a shape, as do gate/up
    lines = [f"## Bytes sent per rank per refresh, fp32, world={world}, rank={rank}, d={dim}, ffn={ffn}, "
             f"{layers} layers (counted from the collectives issued)\n",
             "| method | " + " | ".join(f"{k} {shapes[k][0]}x{shapes[k][1]}" for k in shown)
             + f" | all {layers} layers | vs all-gather |",
             "|---|" + "---|" * (len(shown) + 2)]
    base = sum(traffic[BASELINE].values()) * layers
    for method, per in traffic.items():
        total = sum(per[k] for k in names) * layers
        lines.append(f"| {method} | " + " | ".join(f"{per[k] / mib:.2f} MiB" for k in shown)
                     + f" | {total / mib:.1f} MiB | {total / base:.2f}x |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- part 2: quality
def captured(g: torch.Tensor, basis: torch.Tensor, side: str) -> float:
    return float((g @ basis.T).square().sum() if side == "right" else (basis.T @ g).square().sum())


def energy_rows(grads: dict[str, torch.Tensor], earlier: dict[str, torch.Tensor], rank: int) -> list[tuple]:
    from lrgrad.projectors.svd import sketch_basis, top_singular_basis
    from lrgrad.subspace import projection_side

    rows = []
    for name, g in grads.items():
        side = projection_side(tuple(g.shape), "std")
        exact = captured(g, top_singular_basis(g, rank, side), side)
        previous = top_singular_basis(earlier[name], rank, side) if name in earlier else None
        ratios = []
        for passes in (1, 2):
            for warm in (None, previous):
                generator = torch.Generator().manual_seed(0)
                basis = sketch_basis(g, rank, side, warm, 8, passes - 1, generator)
                ratios.append(captured(g, basis, side) / exact)
        rows.append((name, tuple(g.shape), side, ratios))
    return rows


def llama_gradients(config: str, steps: int, gap: int, seq_len: int, batch: int) -> tuple[dict, dict, int]:
    """Gradients of one middle block's matrices after ``steps`` AdamW steps, and ``gap`` steps earlier."""
    from lrgrad_experiments.pretrain.configs import build_model, get_config
    from lrgrad_experiments.pretrain.data import load_stdlib

    torch.manual_seed(0)
    rank = get_config(config)["rank"]
    model = build_model(config, vocab_size=256, max_seq_len=seq_len)
    block = f"layers.{model.config.num_hidden_layers // 2}."
    tokens = torch.from_numpy(load_stdlib(max_bytes=1_000_000).train.astype("int64"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    kept: dict[int, dict[str, torch.Tensor]] = {}
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,))
        x = torch.stack([tokens[s:s + seq_len + 1] for s in starts])
        logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        if step in (steps - gap, steps):
            kept[step] = {n.split(block)[1]: p.grad.detach().clone() for n, p in model.named_parameters()
                          if block in n and p.dim() == 2}
        opt.step()
    return kept[steps], kept.get(steps - gap, {}), rank


def synthetic_gradients(size: int, rank: int) -> list[tuple[str, dict, dict]]:
    out = []
    for alpha in (0.5, 1.0):
        torch.manual_seed(0)
        grads, earlier = {}, {}
        for name, m, n in (("square", size, size), ("tall (right)", 3 * size, size), ("wide (left)", size, 3 * size)):
            u, _ = torch.linalg.qr(torch.randn(m, min(m, n)))
            v, _ = torch.linalg.qr(torch.randn(n, min(m, n)))
            s = torch.arange(1, min(m, n) + 1, dtype=torch.float32) ** -alpha
            g = (u * s) @ v.T
            grads[name] = g
            earlier[name] = g + 0.3 * g.norm() / (m * n) ** 0.5 * torch.randn(m, n)  # a drifted earlier gradient
        out.append((f"σ_i = i^-{alpha}", grads, earlier))
    return out


def dct_energy_rows(grads: dict[str, torch.Tensor], rank: int) -> list[tuple]:
    """Exact top-r DCT score energy kept by the left-side sketch's selection (oversample 8, 1 pass)."""
    from lrgrad.projectors.dct import dct_coefficients, select_indices, sketched_left_scores

    rows = []
    for name, g in grads.items():
        exact = dct_coefficients(g, "left", "auto").square().sum(dim=1)
        best = float(exact[select_indices(exact, rank).long()].sum())
        scores = sketched_left_scores(g, rank + 8, 0, torch.Generator().manual_seed(0))
        kept = float(exact[select_indices(scores, rank).long()].sum())
        rows.append((name, tuple(g.shape), kept / best, best / float(exact.sum())))
    return rows


def mode_concentrated_gradients(size: int) -> dict[str, torch.Tensor]:
    """G = Q[:, perm] diag(j^-α) R (Q the DCT basis, R Gaussian): energy in a few DCT modes."""
    from lrgrad.projectors.dct import dct_basis

    out = {}
    for alpha in (0.1, 0.25, 0.5):
        gen = torch.Generator().manual_seed(0)
        perm = torch.randperm(size, generator=gen)
        w = torch.arange(1, size + 1, dtype=torch.float32) ** -alpha
        out[f"DCT modes j^-{alpha}"] = dct_basis(size)[:, perm] @ (w[:, None] * torch.randn(size, 3 * size,
                                                                                           generator=gen))
    return out


def dct_energy_table(sets: list[tuple[str, list[tuple]]]) -> str:
    lines = ["## DCT left side: exact top-r score energy kept by the sketch's selection\n",
             "| gradients | matrix | m x n | kept / exact top-r | exact top-r share of ‖G‖² |", "|---|---|---|---|---|"]
    for label, rows in sets:
        for name, shape, kept, share in rows:
            lines.append(f"| {label} | {name} | {shape[0]}x{shape[1]} | {kept:.4f} | {share:.3f} |")
    return "\n".join(lines)


def energy_table(sets: list[tuple[str, list[tuple]]], rank_note: str) -> str:
    lines = [f"## Energy captured by the sketch / by the exact top-r SVD ({rank_note})\n",
             "| gradients | matrix | m x n | side | 1 pass, cold | 1 pass, warm | 2 passes, cold | 2 passes, warm |",
             "|---|---|---|---|---|---|---|---|"]
    for label, rows in sets:
        for name, shape, side, ratios in rows:
            cells = [f"{x:.4f}" for x in ratios]
            if side == "left":  # the left side is always cold-started (see sketch_basis)
                cells[1], cells[3] = "(cold)", "(cold)"
            lines.append(f"| {label} | {name} | {shape[0]}x{shape[1]} | {side} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--dim", type=int, default=LLAMA_1B["dim"])
    parser.add_argument("--ffn", type=int, default=LLAMA_1B["ffn"])
    parser.add_argument("--layers", type=int, default=LLAMA_1B["layers"])
    parser.add_argument("--rank", type=int, default=LLAMA_1B["rank"])
    parser.add_argument("--energy-config", default="llama_20m")
    parser.add_argument("--energy-steps", type=int, default=6)
    parser.add_argument("--energy-gap", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--synthetic-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-energy", action="store_true", help="only the traffic table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    traffic = measure_traffic(args.world, args.dim, args.ffn, args.rank)
    print(traffic_table(traffic, args.dim, args.ffn, args.layers, args.world, args.rank))
    base = sum(traffic[BASELINE].values())
    print(f"\nDefault sharded refresh: {sum(traffic[DEFAULT].values()) / base:.2f}x the all-gather "
          f"(goal <= 0.5x); Gram: {sum(traffic['Gram'].values()) / base:.2f}x.\n", flush=True)
    if args.skip_energy:
        return 0
    grads, earlier, rank = llama_gradients(args.energy_config, args.energy_steps, args.energy_gap, args.seq_len,
                                           args.batch_size)
    sets = [(f"{args.energy_config} step {args.energy_steps}", energy_rows(grads, earlier, rank))]
    synthetic_rank = max(1, args.synthetic_size // 4)
    for label, g, e in synthetic_gradients(args.synthetic_size, synthetic_rank):
        sets.append((label, energy_rows(g, e, synthetic_rank)))
    print(energy_table(sets, f"{args.energy_config}: rank {rank}; synthetic: rank {synthetic_rank}, "
                             f"oversample 8"))
    dct_sets = [(f"{args.energy_config} step {args.energy_steps}, rank {rank}", dct_energy_rows(grads, rank)),
                (f"synthetic, rank {synthetic_rank}",
                 dct_energy_rows(mode_concentrated_gradients(args.synthetic_size), synthetic_rank))]
    print()
    print(dct_energy_table(dct_sets))
    print(f"\n({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
