"""Nuclei segmentation of a cohort's tiles, cached per slide: the cell prior of DiRL-style pretexts.

* :func:`segment_cohort` (:mod:`.runner`): run a registered :class:`~histobench.components.Segmenter` on every
  tile of ``[SlideTiles]``, in worker processes (spawned, never forked, for ``own_process`` segmenters);
* :class:`SegmentationCache` / :class:`SlideSegmentation` (:mod:`.cache`): the per-slide files under
  ``WORKDIR/segment/<segmenter identity>/<tile set key>/<slide_id>.npz`` and their reader;
* :func:`nucleus_features` (:mod:`.features`): the per-nucleus morphology and stain table;
* :class:`OracleSegmenter` (:mod:`.oracle`): the synthetic slides' true nuclei.

Nothing here imports torch.
"""

from histobench.segment.cache import SegmentationCache, SlideSegmentation, cache_root
from histobench.segment.features import nucleus_features
from histobench.segment.runner import SegmentResult, check_maps, segment_cohort

__all__ = ["SegmentationCache", "SlideSegmentation", "SegmentResult", "cache_root", "check_maps",
           "nucleus_features", "segment_cohort"]
