"""histobench-hlss: HLSS, hierarchical language-tied self-supervision (Watawana et al., MICCAI 2024, arXiv
2403.14616): text encoders, task descriptions and the HLSS pretext. Hookimpls and imports only."""

from histobench import hookimpl


@hookimpl
def register_text_encoders(register):
    from histobench_hlss.text_encoders import CachedTextEncoder, MiniLMTextEncoder, OpenCLIPTextEncoder

    register(OpenCLIPTextEncoder)
    register(MiniLMTextEncoder)
    register(CachedTextEncoder)


@hookimpl
def register_pretexts(register):
    from histobench_hlss.pretext import HLSS

    register(HLSS)


@hookimpl
def register_encoders(register):
    from histobench_hlss.encoder import ClipRN50

    register(ClipRN50)


@hookimpl
def register_analyses(register):
    from histobench_hlss.analysis import HLSSAttributes

    register(HLSSAttributes)
