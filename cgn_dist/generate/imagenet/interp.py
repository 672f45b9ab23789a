"""Class interpolation with a built ImageNet counterfactual sampler, and its output folder."""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cgn_dist.data.shards import encode_jpeg, encode_png, write_json_atomic
from cgn_dist.errors import InputError, InputNotFound
from cgn_dist.generate.imagenet.labels import check_classes, class_name

if TYPE_CHECKING:
    from cgn_dist.generate.imagenet.sampler import ImagenetCounterfactualSampler

MECHANISMS = ("all", "shape", "text", "bg")


def interpolate(sampler: "ImagenetCounterfactualSampler", start: Sequence[int], target: int, mechanism: str = "all",
                midpoints: int = 6, u: torch.Tensor | None = None, seed: int = 0) -> dict[str, Any]:
    """The one-hot class input of the chosen mechanism(s) moves linearly
    from its start class to ``target`` in ``midpoints + 2`` steps (ends included); the other mechanisms
    keep their start class; the noise ``u`` (1 x z_dim, used as given) is the same in every frame.
    Without ``u`` it is drawn from ``seed``. Returns uint8 frames: composite, mask, fg, bg (steps first)."""
    from cgn_dist.data.pixels import mask_to_uint8, to_uint8
    from cgn_dist.models.biggan import class_vector, interpolate_class_vectors, truncated_noise

    if mechanism not in MECHANISMS:
        raise InputError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if midpoints < 0:
        raise InputError(f"midpoints must be >= 0, got {midpoints}")
    if len(start) != 3:
        raise InputError(f"start needs three class ids [shape, texture, background], got {list(start)}")
    check_classes("fixed_classes", [*start, target], sampler.n_classes)
    steps = midpoints + 2
    if u is None:
        u = truncated_noise(1, sampler.model.z_dim, sampler.cfg.truncation, seed=[int(seed)])
    u = torch.as_tensor(u, dtype=torch.float32).reshape(1, -1)
    if u.shape[1] != sampler.model.z_dim:
        raise InputError(f"interpolation noise must hold {sampler.model.z_dim} values, got {u.shape[1]}")
    moving = {"all": (0, 1, 2), "shape": (0,), "text": (1,), "bg": (2,)}[mechanism]
    ys = [interpolate_class_vectors(int(start[i]), int(target), steps, sampler.n_classes) if i in moving
          else class_vector([int(start[i])] * steps, sampler.n_classes) for i in range(3)]
    parts = []
    for a in range(0, steps, sampler.cfg.forward_batch):
        b = min(a + sampler.cfg.forward_batch, steps)
        parts.append(sampler.forward(u.expand(b - a, -1), *(y[a:b] for y in ys)))
    cat = {k: torch.cat([p[k] for p in parts]) for k in ("composite", "mask", "foreground", "background")}
    norm = sampler.cfg.normalize
    return {"composite": to_uint8(cat["composite"], norm), "mask": mask_to_uint8(cat["mask"]),
            "fg": to_uint8(cat["foreground"], norm), "bg": to_uint8(cat["background"], norm),
            "start": [int(c) for c in start], "target": int(target), "mechanism": mechanism, "steps": steps,
            "alphas": [round(float(x), 6) for x in torch.linspace(0.0, 1.0, steps)]}


# --- interpolation output ----------------------------------------------------------------------------------

SHEET_ROWS = ("mask", "foreground", "background", "composite")
ROW_LABELS = ("mask", "fg", "bg", "composite")


def interpolation_sheet(frames: Mapping[str, Any], pad: int = 2, labels: bool = True) -> np.ndarray:
    """One uint8 image: rows mask | foreground | background | composite, one column per step.

    With ``labels`` (and the result's start / target / alphas) a caption says which mechanism moves from
    which classes to which, each column is titled with its step (start, the interpolation weight, target)
    and each row with what it shows, so the picture reads on its own."""
    rows = [np.repeat(frames["mask"][..., None], 3, axis=-1), frames["fg"], frames["bg"], frames["composite"]]
    steps, h, w, _ = frames["composite"].shape
    sheet = np.full((len(rows) * (h + pad) + pad, steps * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c in range(steps):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            sheet[y:y + h, x:x + w] = row[c]
    if not labels or "alphas" not in frames:
        return sheet
    return _label(sheet, frames, h, w, pad)


def _short(c: int) -> str:
    return f"{class_name(c).split(',')[0].strip()} ({c})"


def _label(sheet: np.ndarray, frames: Mapping[str, Any], h: int, w: int, pad: int) -> np.ndarray:
    """Caption, step titles and row labels drawn around the grid (black on white, PIL's default font)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=font)
        return x1 - x0, y1 - y0

    start, target, mech = frames["start"], frames["target"], frames["mechanism"]
    moving = {"all": "shape, texture and background", "shape": "shape", "text": "texture", "bg": "background"}[mech]
    caption = (f"{moving} from [{', '.join(_short(c) for c in start)}] (shape, texture, bg) to {_short(target)}")
    alphas = frames["alphas"]
    titles = ["start"] + [f"{a:.2f}" for a in alphas[1:-1]] + ["target"] if len(alphas) > 1 else ["start"]
    line = max(size(t)[1] for t in [caption, *titles, *ROW_LABELS]) + 4
    top, left = 2 * line + 2, max(size(t)[0] for t in ROW_LABELS) + 8
    gh, gw = sheet.shape[:2]
    canvas = Image.new("RGB", (max(gw + left, size(caption)[0] + 8), gh + top), "white")
    canvas.paste(Image.fromarray(sheet), (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), caption, fill="black", font=font)
    for j, text in enumerate(titles):
        tw, _ = size(text)
        draw.text((left + pad + j * (w + pad) + (w - tw) // 2, line + 2), text, fill="black", font=font)
    for i, text in enumerate(ROW_LABELS):
        tw, th = size(text)
        draw.text((left - tw - 4, top + pad + i * (h + pad) + (h - th) // 2), text, fill="black", font=font)
    return np.asarray(canvas).copy()


def write_interpolation(out_dir: str | os.PathLike, result: Mapping[str, Any], image_format: str = "png",
                        jpeg_quality: int = 95, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``out_dir/interpolation/``: sheet.png, frame_XXX.<fmt> (composites), interpolation.json.

    The folder is built under a temporary name and swapped in whole, so readers never see a partial set
    (a previous interpolation there is replaced)."""
    out_dir = Path(out_dir)
    final = out_dir / "interpolation"
    tmp = out_dir / f".tmp-interpolation-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        (tmp / "sheet.png").write_bytes(encode_png(interpolation_sheet(result)))
        frames = []
        for i, frame in enumerate(result["composite"]):
            name = f"frame_{i:03d}.{image_format}"
            data = encode_png(frame) if image_format == "png" else encode_jpeg(frame, quality=jpeg_quality)
            (tmp / name).write_bytes(data)
            frames.append(name)
        doc = {k: result[k] for k in ("start", "target", "mechanism", "steps", "alphas")}
        doc.update(start_names=[class_name(c) for c in result["start"]], target_name=class_name(result["target"]),
                   frames=frames, sheet="sheet.png", sheet_rows=list(SHEET_ROWS),
                   sheet_columns=["start", *(f"{a:.2f}" for a in result["alphas"][1:-1]), "target"])
        doc.update(meta or {})
        write_json_atomic(tmp / "interpolation.json", doc)
        old = None
        if final.exists():
            old = out_dir / f".old-interpolation-{uuid.uuid4().hex[:8]}"
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_noise(path: str | os.PathLike) -> torch.Tensor:
    """A fixed noise vector file (1 x z_dim tensor, e.g. the authors' u_fixed.pth), used as stored."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFound(f"noise file {p} not found (generate.interp_noise)")
    from cgn_dist.weights import load_user_file

    u = load_user_file(p, "generate.interp_noise")
    if not isinstance(u, torch.Tensor):
        raise InputError(f"{p} holds a {type(u).__name__}, not a noise tensor")
    return u.float().reshape(1, -1)

