"""Label transfer by dense correspondence (``fit-labeler --transfer-labels flow``): what it moves, and whether it helps.

The labeler learns "features of the inversion G(w_i) -> labels of real image i"; where the
inversion draws a part elsewhere, ``--transfer-labels flow`` moves the labels onto the
reconstruction by optical flow (`handsoff.label.transfer`). No oracle labels exist for a
reconstruction, so this measures three things that need none:

1. **Flow methods on known warps.** The held-out renders, each warped by a smooth random field
   and degraded like a reconstruction (blur, colour shift, noise): end-point error of DIS and
   Farneback against the known flow (and of no flow), the share of pixels the
   forward-backward check keeps, and how many of the kept pixels get the right class.
2. **What the transfer moves.** The 16 labeled images (draw 0 of the quality study) onto their
   inversions: kept share, mean flow, keypoints still visible, per-class IoU between the
   transferred and the real segmentation on the kept pixels (1 = nothing moved; small parts
   move most), mean keypoint displacement.
3. **Labeler on held-out images.** A labeler fit on the 16 with and without the transfer,
   applied to held-out real images through their inversions and scored against their real
   labels (as the quality study's "labeler on held-out" limit): seg mIoU and the small parts'
   IoU, keypoint PCK@0.05 / @0.1, depth RMSE; mean over labeler seeds.

Both at the encoder's codes (0 refinement steps) and at the study's 50. Uses the quality
study's cache (``benchmarks/work/quality``) for rendered sets and latents; the labelers use
the study's budget (1000 steps, 3 members). About 15 CPU-minutes with the latents cached (the
inversions of 48 images at 50 steps add about 7).

    python benchmarks/transfer.py                        # refine 0 and 50, seeds 0 1
    python benchmarks/transfer.py --refine-steps 50 --seeds 0
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402  (the study's settings, seeds and cached artefacts)
from _machine import device_name, load_average  # noqa: E402
from handsoff.data.labeled_set import IGNORE_INDEX, LabeledSet  # noqa: E402
from handsoff.label.defaults import DEFAULT_FLOW_METHOD, FLOW_METHODS  # noqa: E402
from handsoff.label.evaluate import evaluate_labeler  # noqa: E402
from handsoff.label.train import fit_labeler  # noqa: E402
from handsoff.label.transfer import (consistent_flow, dense_flow, labels_on_reconstructions,  # noqa: E402
                                     summarize)
from handsoff.metrics import confusion_matrix, segmentation_scores  # noqa: E402
from handsoff.utils.io import atomic_write_bytes  # noqa: E402

SMALL_PARTS = ("eye", "brow", "nose", "mouth", "ear")
WARP_SEED = 0


def _say(message: str) -> None:
    print(f"[transfer {datetime.datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


def _small_parts(per_class: dict[str, Optional[float]]) -> dict[str, Optional[float]]:
    """The IoU of every class whose name holds a small part's name (eye, brow, ...)."""
    return {name: iou for name, iou in per_class.items() if any(part in name for part in SMALL_PARTS)}


# ---------------------------------------------------------------------------------------------
# 1. flow methods on known warps

def _smooth_field(rng: np.random.RandomState, size: int, amplitude: float) -> np.ndarray:
    """A smooth random displacement field [size, size, 2] with its largest component = amplitude."""
    field = cv2.resize(rng.randn(6, 6, 2).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    return field / np.abs(field).max() * amplitude


def _degrade(rng: np.random.RandomState, image: np.ndarray) -> np.ndarray:
    """Blur, a colour shift and noise: what separates a reconstruction from its image, besides geometry."""
    out = cv2.GaussianBlur(image, (0, 0), 1.5).astype(np.float32)
    out = out * rng.uniform(0.8, 1.2, 3) + rng.uniform(-20, 20, 3) + rng.randn(*out.shape) * 4
    return np.clip(out, 0, 255).astype(np.uint8)


def known_warps(labels: LabeledSet, methods: Sequence[str]) -> dict[str, Any]:
    """EPE, kept share and class agreement of each method on warped, degraded copies of ``labels``' images."""
    rng = np.random.RandomState(WARP_SEED)
    size = labels.images[0].shape[0]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    cases = []
    for image, seg in zip(labels.images, labels.seg):
        true = _smooth_field(rng, size, rng.uniform(2, 6))  # warped(q) = image(q + true(q))
        warped = cv2.remap(image, xs + true[..., 0], ys + true[..., 1], cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT)
        true_seg = cv2.remap(seg, xs + true[..., 0], ys + true[..., 1], cv2.INTER_NEAREST,
                             borderMode=cv2.BORDER_REFLECT)
        cases.append((image, _degrade(rng, warped), true, seg, true_seg))
    result: dict[str, Any] = {
        "images": len(cases), "displacement_px": float(np.mean([np.linalg.norm(c[2], axis=-1).mean() for c in cases])),
        "no_flow": {"epe_px": float(np.mean([np.linalg.norm(c[2], axis=-1).mean() for c in cases])),
                    "seg_agreement": float(np.mean([(c[3] == c[4]).mean() for c in cases]))}}
    for method in methods:
        epe, kept, agree, seconds = [], [], [], 0.0
        for image, warped, true, seg, true_seg in cases:
            start = time.perf_counter()
            backward, forward = dense_flow(warped, image, method), dense_flow(image, warped, method)
            seconds += time.perf_counter() - start
            keep = consistent_flow(backward, forward)
            moved = cv2.remap(seg, xs + backward[..., 0], ys + backward[..., 1], cv2.INTER_NEAREST,
                              borderMode=cv2.BORDER_REFLECT)
            epe.append(np.linalg.norm(backward - true, axis=-1).mean())
            kept.append(keep.mean())
            agree.append((moved == true_seg)[keep].mean() if keep.any() else np.nan)
        result[method] = {"epe_px": float(np.mean(epe)), "kept": float(np.mean(kept)),
                          "seg_agreement_kept": float(np.nanmean(agree)),
                          "ms_per_pair": round(1000 * seconds / len(cases), 2)}
    return result


# ---------------------------------------------------------------------------------------------
# 2. what the transfer moves

def moved_by_transfer(G: torch.nn.Module, ws: torch.Tensor, labels: LabeledSet, method: str) -> dict[str, Any]:
    """Transfer statistics, per-class IoU transferred vs real seg (kept pixels), keypoint displacement."""
    start = time.perf_counter()
    result = labels_on_reconstructions(G, ws, labels, method=method)
    seconds = time.perf_counter() - start
    moved = result.labels
    # Score the transferred seg against the real one where the transfer kept a label.
    pred = np.stack(moved.seg)
    target = np.where(pred == IGNORE_INDEX, IGNORE_INDEX, np.stack(labels.seg))
    seg = segmentation_scores(confusion_matrix(pred, target, len(labels.classes)), labels.classes)
    still = (labels.keypoints[..., 2] > 0.5) & (moved.keypoints[..., 2] > 0.5)
    shift = np.linalg.norm(moved.keypoints[..., :2] - labels.keypoints[..., :2], axis=-1)
    return {**summarize(result.stats), "seconds": round(seconds, 2),
            "keypoints_unknown": float((~result.keypoint_known).mean()),
            "keypoint_shift_px": float(shift[still].mean()) if still.any() else None,
            "seg_iou_transferred_vs_real": {"miou": seg["miou"], "small_parts": _small_parts(seg["per_class_iou"]),
                                            "per_class": seg["per_class_iou"]}}


# ---------------------------------------------------------------------------------------------
# 3. labeler on held-out images

def _scores(result: dict[str, Any]) -> dict[str, Any]:
    return {"seg_miou": result["seg"]["miou"], "small_parts_iou": _small_parts(result["seg"]["per_class_iou"]),
            "pck@0.05": result["keypoints"]["pck@0.05"], "pck@0.1": result["keypoints"]["pck@0.1"],
            "depth_rmse": result["depth"]["rmse"]}


def _mean_scores(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(values: list[Optional[float]]) -> Optional[float]:
        kept = [v for v in values if v is not None]
        return float(np.mean(kept)) if kept else None

    keys = ("seg_miou", "pck@0.05", "pck@0.1", "depth_rmse")
    out: dict[str, Any] = {k: mean([r[k] for r in runs]) for k in keys}
    out["sd"] = {k: float(np.std([r[k] for r in runs])) for k in keys}
    out["small_parts_iou"] = {p: mean([r["small_parts_iou"].get(p) for r in runs]) for p in runs[0]["small_parts_iou"]}
    return out


def labeler_on_heldout(G: torch.nn.Module, ws: torch.Tensor, labels: LabeledSet, held_ws: torch.Tensor,
                       held: LabeledSet, variant: str, seeds: Sequence[int], settings: quality.Settings
                       ) -> dict[str, Any]:
    """Fit a labeler per seed with ``variant`` ('none' or a flow method) and score it on the held-out inversions."""
    runs, seconds = [], []
    for seed in seeds:
        _say(f"fit labeler ({variant}, seed {seed}, {settings.labeler_steps} steps, "
                     f"{settings.ensemble} members)")
        start = time.perf_counter()
        transfer = {} if variant == "none" else {"transfer_labels": "flow", "flow_method": variant}
        labeler = fit_labeler(G, ws, labels, ensemble=settings.ensemble, steps=settings.labeler_steps, seed=seed,
                              progress=False, **transfer)
        seconds.append(time.perf_counter() - start)
        runs.append(_scores(evaluate_labeler(G, labeler, held_ws, held)))
    return {**_mean_scores(runs), "runs": runs, "fit_seconds": [round(s, 1) for s in seconds]}


# ---------------------------------------------------------------------------------------------

def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refine-steps", type=int, nargs="+", default=[0, 50],
                   help="per-image refinement steps of the inversions (default: 0 50; the study uses 50)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="labeler seeds (default: 0 1)")
    p.add_argument("--methods", nargs="+", choices=FLOW_METHODS, default=list(FLOW_METHODS),
                   help="flow methods to compare (default: all)")
    p.add_argument("--heldout-n", type=int, default=32, help="held-out images (default: 32)")
    p.add_argument("--labeler-steps", type=int, help="labeler steps (default: the study's, 1000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "quality",
                   help="the quality study's cache (default: benchmarks/work/quality)")
    p.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/transfer-cpu.json)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _markdown(record: dict[str, Any]) -> str:
    lines = ["| refine | labeler | seg mIoU | eye / brow / nose / mouth / ear IoU | PCK@0.05 | PCK@0.1 | depth RMSE |",
             "|---|---|---|---|---|---|---|"]
    for refine, block in record["refine"].items():
        for variant, s in block["labeler_on_heldout"].items():
            parts = " / ".join("-" if v is None else f"{v:.3f}" for v in s["small_parts_iou"].values())
            lines.append(f"| {refine} | {variant} | {s['seg_miou']:.3f} | {parts} | {s['pck@0.05']:.3f} | "
                         f"{s['pck@0.1']:.3f} | {s['depth_rmse']:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    settings = replace(quality.Settings(), heldout_n=args.heldout_n)
    settings = replace(settings, labeler_steps=args.labeler_steps or settings.labeler_steps)
    device = torch.device("cpu")
    out = args.out or quality.RESULTS / "transfer-cpu.json"
    started, cpu_started, load_before = time.perf_counter(), time.process_time(), load_average()

    def study(refine_steps: int) -> quality.Study:
        return quality.Study(replace(settings, refine_steps=refine_steps), args.work, device, quality.DEFAULT_ENCODER,
                             quality.DEFAULT_GENERATOR, progress=not args.no_progress)

    base = study(settings.refine_steps)
    labeled = base.labeled(settings.sizes[0], 0)
    heldout = base.rendered("heldout", settings.heldout_n, quality.SEEDS["heldout"])
    labels, held = base.labeled_set(labeled), base.labeled_set(heldout)
    G = base.generator()

    _say("flow methods on known warps")
    warps = known_warps(held, args.methods)
    per_refine: dict[str, Any] = {}
    for refine in args.refine_steps:
        s = study(refine)
        ws, inv = s.latents(quality.PIPELINES["main"], labeled)
        held_ws, held_inv = s.latents(quality.PIPELINES["main"], heldout)
        per_refine[str(refine)] = {
            "inversion": {"labeled": {"lpips": inv["lpips_mean"], "psnr": inv["psnr_mean"]},
                          "heldout": {"lpips": held_inv["lpips_mean"], "psnr": held_inv["psnr_mean"]}},
            "moved": {m: moved_by_transfer(G, ws, labels, m) for m in args.methods},
            "labeler_on_heldout": {v: labeler_on_heldout(G, ws, labels, held_ws, held, v, args.seeds, settings)
                                   for v in ("none", *args.methods)}}

    record = {
        "benchmark": "label transfer by dense correspondence (fit-labeler --transfer-labels flow)",
        "device": f"cpu: {device_name(device)}, {os.cpu_count()} cores",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "opencv": cv2.__version__,
        "settings": {**{k: v for k, v in asdict(settings).items() if k in ("heldout_n", "labeler_steps", "ensemble")},
                     "labeled": f"{labeled.name} (draw 0)", "heldout": heldout.name, "refine_steps": args.refine_steps,
                     "labeler_seeds": args.seeds, "flow_methods": args.methods,
                     "default_flow_method": DEFAULT_FLOW_METHOD,
                     "seeds": quality.SEEDS, "warp_seed": WARP_SEED},
        "known_warps": warps,
        "refine": per_refine,
        "load_average": {"before": load_before, "after": load_average()},
        "wall_time_s": round(time.perf_counter() - started, 1),
        "cpu_time_s": round(time.process_time() - cpu_started, 1),
        "how_to_rerun": " ".join(["python benchmarks/transfer.py",
                                  *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
    }
    record["markdown"] = _markdown(record)
    atomic_write_bytes(out, (json.dumps(record, indent=1) + "\n").encode())
    print("\nknown warps: " + ", ".join(f"{m} EPE {warps[m]['epe_px']:.2f} px (kept {warps[m]['kept']:.0%})"
                                        for m in args.methods) + f", no flow {warps['no_flow']['epe_px']:.2f} px")
    print(record["markdown"])
    print(f"\nwrote {out} ({record['wall_time_s']:.0f} s wall, {record['cpu_time_s']:.0f} s CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
