"""Parts that student–teacher self-supervised pretexts compose (DINO, SLPD, DiRL, ...).

Each module holds one role, and pretext plugins import what they need:

* :mod:`histobench.ssl.heads`: :class:`~histobench.ssl.heads.DINOProjectionHead` and
  :class:`~histobench.ssl.heads.BackboneWithHead` (one forward per run of same-size views);
* :mod:`histobench.ssl.losses`: :class:`~histobench.ssl.losses.DINOLoss` (centred, sharpened cross-entropy);
* :mod:`histobench.ssl.teacher`: the EMA teacher (:func:`~histobench.ssl.teacher.make_teacher`,
  :func:`~histobench.ssl.teacher.ema_update`, :class:`~histobench.ssl.teacher.EMATeacher` with its cosine
  momentum schedule), stochastic depth on the student and DINO's last-layer freeze;
* :mod:`histobench.ssl.steps`: the per-step augmentation generator from ``(seed, step, rank)`` and a
  precomputed schedule's value at a step;
* :mod:`histobench.ssl.attention`: the last block's [CLS]→patch attention of a ViT, recomputed from its
  ``qkv`` projection (fused attention returns no weights).

Importing this package does not import torch; the modules do.
"""
