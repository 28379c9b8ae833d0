"""histobench's core analyses (``histobench analyze NAME``), registered in :mod:`histobench.builtin`."""
