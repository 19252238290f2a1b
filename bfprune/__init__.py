"""bfprune: pruning at initialization and butterfly / K-matrix factorizations in JAX + Flax.

The public API, re-exported from its modules:

* masks (``bfprune.pruning.masks``): ``ones_like``, ``apply_masks``, ``masks_from_scores``,
  ``density``, ``kept_per_layer``, ``tree_map_masked``, predicates ``is_kernel`` /
  ``is_kernel_or_twiddle``. Masks mirror the params: a bool array (True = kept) on each
  prunable leaf, ``None`` on the others (which JAX's tree functions skip: map with
  ``tree_map_masked``, or keep them with ``is_leaf=is_none``);
* training (``bfprune.optim``): ``masked_optimizer`` (any optax optimizer, pruned weights kept
  exactly zero), ``set_masks``, ``get_masks``, ``MaskedState``;
* scores (``bfprune.pruning.scores``): ``random_scores``, ``magnitude_scores``, ``snip_scores``,
  ``grasp_scores``, ``synflow_scores``;
* schedules (``bfprune.pruning.schedule``): ``prune``, ``make_score_fn``, ``density_schedule``;
* metrics (``bfprune.metrics``): ``summary``, ``layer_table``, ``detect_collapse``, ``count_params``;
* structured layers (``bfprune.structured``): ``butterfly_multiply``, ``butterfly_to_dense``,
  ``ButterflyDense``, ``KMatrixDense``, ``FactorizedDense``, ``KOPS2D``; Monarch
  (``bfprune.structured.monarch``): ``MonarchDense``, ``monarch_multiply``, ``monarch_to_dense``;
* models (``bfprune.models``): ``FC``, ``VGG16``; training (``bfprune.train``), data
  (``bfprune.data``), checkpoints (``bfprune.checkpoint``) and sparse inference
  (``bfprune.sparse``) as modules.
"""
from bfprune import data, metrics, models, optim, train
from bfprune.metrics import count_params, detect_collapse, layer_table, summary
from bfprune.models import FC, VGG16
from bfprune.optim import MaskedState, get_masks, masked_optimizer, set_masks
from bfprune.pruning.masks import (
    apply_masks, count_kept, count_prunable, density, density_from_compression, is_kernel,
    is_kernel_or_twiddle, is_none, kept_per_layer, masks_from_scores, ones_like, tree_map_masked)
from bfprune.pruning.schedule import density_schedule, make_score_fn, prune
from bfprune.pruning.scores import (
    grasp_scores, magnitude_scores, random_scores, snip_scores, synflow_scores)
from bfprune.structured.butterfly import butterfly_multiply, butterfly_to_dense
from bfprune.structured.layers import (
    ButterflyDense, FactorizedDense, KMatrixDense, KOPS2D)
from bfprune.structured.monarch import MonarchDense, monarch_multiply, monarch_to_dense

__version__ = "0.1.0"
