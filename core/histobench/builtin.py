"""histobench's own components, registered through the same entry point group as every plugin (``core``).

The named evaluation protocols, the synthetic ``oracle`` segmenter, the dependency-free ``hashing`` text
encoder and the core analyses live in the core because every method shares them; this module only registers
them. It is always loaded, also when ``HISTOBENCH_LOAD_PLUGINS`` names other plugins only (``run`` needs a
protocol), unless ``HISTOBENCH_DISABLE_PLUGINS`` names ``core``.
"""

from histobench import hookimpl


@hookimpl
def register_segmenters(register):
    from histobench.segment.oracle import OracleSegmenter

    register(OracleSegmenter)


@hookimpl
def register_protocols(register):
    from histobench.evaluate.knn import KNNHierarchical
    from histobench.evaluate.protocols import FrozenMIL
    from histobench.evaluate.topk import TopKFinetune

    register(FrozenMIL)
    register(TopKFinetune)
    register(KNNHierarchical)


@hookimpl
def register_text_encoders(register):
    from histobench.text.hashing import HashingTextEncoder

    register(HashingTextEncoder)


@hookimpl
def register_analyses(register):
    from histobench.analyses.attention import AttentionAnalysis
    from histobench.analyses.cka_analysis import CKAAnalysis

    register(AttentionAnalysis)
    register(CKAAnalysis)
