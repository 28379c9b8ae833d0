"""Text encoders shared by every method: the dependency-free ``hashing`` encoder (tests, offline demos).

Method plugins register the real ones (HLSS: open_clip's text tower, MiniLM, cached text banks).
"""
