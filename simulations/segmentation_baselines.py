"""Pooled and local baselines of a simulated segmentation study, on the federation's own slices.

Each baseline starts from the run's initial adapter (the pretrained network, LoRA at zero),
reads each hospital's training and validation slices exactly as its ClientApp does
(:func:`client.segmentation_site.load_segmentation_site`, the embeddings already cached by the
federation), and trains in as many chunks as the study has rounds:

- **local**: each hospital alone, ``local_steps`` per chunk on its own training slices, the
  chunk kept whose Dice on its own validation cases is highest;
- **pooled**: every hospital's training slices together, ``local_steps`` x hospitals per chunk
  (the gradient steps the federation takes in a round), the chunk kept whose Dice over all
  validation cases is highest;
- **best hospital alone**: the local adapter whose Dice over *all* hospitals' validation cases
  is highest (chosen on validation, like the classification runs).

Every choice is made on validation; the test cases score each chosen adapter once.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import Context, RecordDict
from peft import PeftModel

from client.segmentation import segmentation_scores
from client.segmentation_site import SegmentationSite, load_segmentation_site
from models.adapters import adapter_state, load_adapter_state
from models.segmentation import SliceSet, train_segmenter
from server.rounds import initial_model
from server.study import Study

logger = logging.getLogger(__name__)

Scorer = Callable[[PeftModel], dict[str, float]]
"""Test scores of an adapter (:func:`simulations.segmentation_study.score_test_cases`)."""


def pool_slices(sets: list[SliceSet]) -> SliceSet:
    """One :class:`SliceSet` of several hospitals' slices; case indices kept apart."""
    offsets = np.cumsum([0] + [int(s.cases.max()) + 1 if len(s) else 0 for s in sets[:-1]])
    return SliceSet(torch.cat([s.embeddings for s in sets]), torch.cat([s.targets for s in sets]),
                    [m for s in sets for m in s.masks], torch.cat([s.boxes for s in sets]),
                    torch.cat([s.whole for s in sets]),
                    torch.cat([s.cases + int(o) for s, o in zip(sets, offsets, strict=True)]))


def pool_sites(sites: list[SegmentationSite]) -> SegmentationSite:
    """The hospitals' sites as one (validation spacings in the pooled case order)."""
    return SegmentationSite(pool_slices([s.train for s in sites]),
                            pool_slices([s.val for s in sites]),
                            sum(s.train_patients for s in sites),
                            [g for s in sites for g in s.val_spacing])


def hospital_segmentation_sites(nodes: dict[int, dict[str, Any]], study: Study
                                ) -> list[SegmentationSite]:
    """Each simulated hospital's slices, read as its ClientApp reads them."""
    model = initial_model(study.model, study.train.seed)
    return [load_segmentation_site(
        Context(run_id=0, node_id=node, node_config=config, state=RecordDict(), run_config={}),
        model, study.segmentation, study.classes) for node, config in nodes.items()]


def train_chosen_on_validation(study: Study, train: SegmentationSite, val: SegmentationSite,
                               steps_per_chunk: int) -> tuple[PeftModel, float]:
    """Train from the initial adapter in ``study.federation.rounds`` chunks; returns the model
    holding the chunk with the best validation Dice on ``val``, and that Dice."""
    model = initial_model(study.model, study.train.seed)
    settings, best, best_dice = study.segmentation, adapter_state(model), -1.0
    for chunk in range(study.federation.rounds):
        train_segmenter(model, train.train, steps_per_chunk, study.train.batch_size,
                        study.train.lr, study.train.seed + chunk, mode=settings.prompt,
                        max_shift=settings.box_shift)
        dice = segmentation_scores(model, val)["dice"]
        if dice >= best_dice:  # a tie goes to the later chunk, as for the federation
            best, best_dice = copy.deepcopy(adapter_state(model)), dice
    load_adapter_state(model, best)
    return model, best_dice


def segmentation_baselines(study: Study, nodes: dict[int, dict[str, Any]], score: Scorer,
                           which: list[str]) -> dict[str, Any]:
    """``summary.json``'s ``pooled``, ``local``, ``local_per_hospital`` and ``best_hospital``
    (test scores of the adapters chosen on validation) for the baselines in ``which``."""
    sites = hospital_segmentation_sites(nodes, study)
    everyone = pool_sites(sites)
    steps = study.train.local_steps or 1
    out: dict[str, Any] = {}
    if "pooled" in which:
        model, _ = train_chosen_on_validation(study, everyone, everyone, steps * len(sites))
        out["pooled"] = score(model)
    if "local" in which:
        per_hospital, chosen = [], []
        for site in sites:
            model, _ = train_chosen_on_validation(study, site, site, steps)
            per_hospital.append(score(model))
            chosen.append(segmentation_scores(model, everyone)["dice"])
        out["local_per_hospital"] = per_hospital
        out["local"] = {k: float(np.mean([s[k] for s in per_hospital]))
                        for k in per_hospital[0]}
        best = int(np.argmax(chosen))
        out["best_hospital"] = {"hospital": best, "validation_dice": chosen[best],
                                **per_hospital[best]}
    return out
