"""Built-in, procedurally rendered image domains with exact labels.

>>> from handsoff.domains import get_domain
>>> batch = get_domain("heads").render(n=4, seed=0, size=64)
>>> batch.images.shape, batch.seg.shape, batch.depth.shape, batch.keypoints.shape
((4, 64, 64, 3), (4, 64, 64), (4, 64, 64), (4, 10, 3))

Conventions of every domain's `LabeledBatch` (and of the labeled-set folder format):

* ``seg``: class index into ``domain.classes`` (0 = background), 255 = ignore.
* ``depth``: camera-space depth of the surface that the label belongs to, larger = farther;
  'heads' puts the background at `FAR_DEPTH` = 10.0 and heads at about 5 (the frame spans
  [-1, 1], orthographic camera).
* ``keypoints``: ``x, y`` in pixels, the pixel in column ``j`` covering ``[j, j+1)``;
  ``visible`` is 1 when the point is inside the frame and not hidden; left/right are the
  subject's own sides.
* Image ``i`` of ``seed`` depends only on ``(seed, i, size)``: ``render(n, seed, size, start)``
  gives the same bytes however a range is split into calls.

`DOMAINS` maps names to domain objects (explicit instances, not classes looked up by name).
`handsoff.domains.parallel.render_chunks` renders long ranges in worker processes;
`handsoff.domains.preview.label_grid` draws a batch with its labels.
"""
from __future__ import annotations

from handsoff.domains.base import Domain, LabeledBatch
from handsoff.domains.heads import FAR_DEPTH, HeadsDomain

__all__ = ["LabeledBatch", "Domain", "HeadsDomain", "FAR_DEPTH", "DOMAINS", "DEFAULT_DOMAIN", "get_domain"]

DEFAULT_DOMAIN = "heads"

#: The registry of built-in domains.
DOMAINS: dict[str, Domain] = {"heads": HeadsDomain()}


def get_domain(name: str = DEFAULT_DOMAIN) -> Domain:
    """The built-in domain called ``name``; an unknown name raises ValueError listing the known ones."""
    try:
        return DOMAINS[name]
    except KeyError:
        raise ValueError(f"unknown domain {name!r}; known domains: {', '.join(sorted(DOMAINS))}") from None
