"""Normalized-momentum optimizers: AuON, Hybrid-AuON and Muon, full-rank or inside a projector.

Their rows (rule, projector, the defaults they change) are in ``lrgrad.optim.presets``; this module
names the family.

* ``AuON`` — "AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates", arXiv:2509.24320.
* ``HybridAuON`` — the same paper: ``ns_steps`` (default 1) Newton–Schulz iterations, then AuON's scaling.
* ``Muon`` — K. Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks";
  ``match_rms_adamw`` from "Muon is Scalable for LLM Training", arXiv:2502.16982.

All three take ``model.parameters()`` directly: matrices (N-d params viewed as
``(shape[0], rest)``) get the normalized update, 1-D params (biases, norms) get AdamW in
the same optimizer with the group's ``adamw_lr``/``adamw_betas``/``adamw_eps``/
``adamw_weight_decay``. ``adamw_lr`` follows LR schedulers (it is scaled by ``lr / lr₀``, ``lr₀`` the
group's lr as built).
Embeddings and the output head are matrices, but Muon's guidance gives them AdamW: when they
can be recognised - ``model.named_parameters()`` or ``lrgrad.param_groups(model, rank=...)`` -
they get AdamW by default (``adamw_for_embeddings=True``; see
``lrgrad.optim.embedding_routing``). With a plain ``model.parameters()`` nothing carries a name,
so put them in a group with ``rule="adamw"`` yourself::

    opt = lrgrad.Muon(model.named_parameters(), lr=0.02)      # embed_tokens / lm_head -> AdamW

With ``rank=r`` (and any ``projector=``, e.g. ``"svd"``, ``"random"``) the rule runs on the
low-rank gradient R: the momentum is r x n (or m x r) instead of m x n, and the update is
``up(normalize(momentum(R)))``. Muon's shape factor then uses R's shape. ``scale`` defaults
to 1 (the normalized direction already has a fixed size).
"""

from __future__ import annotations

from lrgrad.optim.presets import AuON, DCTAuON, GaLoreAuON, GaLoreMuon, HybridAuON, Muon

__all__ = ["AuON", "DCTAuON", "GaLoreAuON", "GaLoreMuon", "HybridAuON", "Muon"]
