"""`generate`: load the checkpoints named by paths and run the engine (what ``handsoff generate`` does)."""
from __future__ import annotations

from typing import Optional

from handsoff.defaults import DEFAULT_GENERATOR
from handsoff.gan.checkpoints import load_generator
from handsoff.gan.digest import generator_digest
from handsoff.invert.latents import load_latents
from handsoff.utils.distributed import device_for, process_group
from handsoff.synth.engine import GenerateResult, generate_corpus
from handsoff.synth.labeling import load_labeling
from handsoff.synth.settings import GenerateSettings
from handsoff.utils.io import PathLike

__all__ = ["generate"]


def generate(labeler: PathLike, out: PathLike, settings: GenerateSettings, *, generator: PathLike = DEFAULT_GENERATOR,
             batch: int = 16, device: str = "auto", around: Optional[PathLike] = None,
             progress: bool = True) -> GenerateResult:
    """Generate (or resume) a labeled corpus into ``out``; see `handsoff.synth.engine.generate_corpus`.

    Under ``torchrun`` every process calls this; the shards are split over the processes
    and rank 0 writes the manifest, report and preview.

    Args:
        labeler: the labeler file (`handsoff fit-labeler`), made for ``generator``.
        out: the corpus folder.
        settings: what to generate.
        generator: the generator checkpoint (default: the shipped built-in-domain one).
        batch: latents per forward pass.
        device: ``auto``, ``cpu``, ``cuda`` (``cuda:LOCAL_RANK`` under torchrun) or ``cuda:K``.
        around: a latents file (`handsoff invert`) to make variations of, or None.
        progress: show a progress bar.
    """
    with process_group(device) as ranks:
        dev = device_for(device, ranks)
        G = load_generator(generator, device=dev)
        label_fn, info = load_labeling(labeler, G, dev, settings.noise_mode)
        around_ws = None
        if around is not None:
            around_ws = load_latents(around, expect_digest=generator_digest(G), expect_shape=(G.num_ws, G.w_dim)).ws
        sources = {"generator": generator, "labeler": labeler, **({"around": around} if around is not None else {})}
        return generate_corpus(G, label_fn, info, out, settings, batch=batch, around=around_ws, ranks=ranks,
                               progress=progress, sources=sources)
