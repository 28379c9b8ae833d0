"""``histobench analyze``: analyses of trained encoders on a fixed held-out tile set.

An analysis is a plugin component (:class:`histobench.components.Analysis`, hook ``register_analyses``). The
core loads the encoders (:mod:`.encoders`), draws the task's held-out tile set (:mod:`.tiles`), hands both to
the analysis as :class:`AnalysisInputs`, and logs the :class:`AnalysisResult` it returns (:mod:`.runner`).
Analyses this stage is made for: DiRL's attention sparsity of the last block's class token (Kapse et al.,
arXiv 2309.06439), and the layer-wise CKA between two encoders (Kornblith et al., ICML 2019) that
HistoTransfer (Sharma et al., IEEE BHI 2021) uses.
"""

from histobench.analyze.inputs import AnalysedEncoder, AnalysisInputs, AnalysisResult

__all__ = ["AnalysedEncoder", "AnalysisInputs", "AnalysisResult"]
