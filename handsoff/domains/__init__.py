"""Built-in, procedurally rendered image domains with exact labels.

>>> from handsoff.domains import get_domain
>>> batch = get_domain("heads").render(n=4, seed=0, size=64)
>>> batch.images.shape, batch.seg.shape, batch.keypoints.shape
((4, 64, 64, 3), (4, 64, 64), (4, 10, 3))

`DOMAINS` maps names to domain objects (explicit instances, not classes looked up by name).
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
