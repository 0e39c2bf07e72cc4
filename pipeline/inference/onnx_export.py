"""ONNX export of the prompt-to-mask decoder of any registry method, plugins included.

The exported graph takes SAM's ONNX-decoder inputs (the convention of segment-anything's exported
decoder, which browser and C++ front ends already speak) and returns low-res masks and scores:

| input | shape | meaning |
|---|---|---|
| ``image_embeddings`` | ``[1, C, g, g]`` float32 | the frozen encoder's output for the image |
| ``point_coords`` | ``[1, N, 2]`` float32 | points in the MODEL-INPUT frame; a box is 2 points (corners) |
| ``point_labels`` | ``[1, N]`` float32 | 1 fg, 0 bg, 2/3 box corners, -1 padding (add one (0, 0, -1) when there is no box) |
| ``mask_input`` | ``[1, 1, 4g, 4g]`` float32 | a previous low-res logit map, or zeros |
| ``has_mask_input`` | ``[1]`` float32 | 1 when ``mask_input`` is used, else 0 |

Outputs: ``scores [1, M]`` (SAM's predicted IoU) and ``low_res_masks [1, M, 4g, 4g]`` (logits; upsample
with :func:`pipeline.modeling.transforms.postprocess_logits`); M = 1, or 3 with ``--multimask``. N is
dynamic. The prompt embedding is written with arithmetic masks instead of boolean indexing (ONNX has no
in-place masked assignment); :func:`onnx_inputs` builds these inputs from a :class:`Prompt`.

    python -m stages.export_onnx --method stable_sam --out stable_sam_decoder.onnx
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.inference.prompts import Prompt
from pipeline.modeling.decoder import decode_with_alpha
from pipeline.modeling.methods import PromptableDecoder

if TYPE_CHECKING:
    from pipeline.inference.predictor import Predictor

INPUT_NAMES = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input")
OUTPUT_NAMES = ("scores", "low_res_masks")
OPSET = 17  # GridSample (DSP) needs >= 16


class OnnxPromptDecoder(nn.Module):
    """A :class:`PromptableDecoder` behind SAM's ONNX decoder inputs (see the module docstring)."""

    def __init__(self, decoder: PromptableDecoder, *, multimask_output: bool = False) -> None:
        super().__init__()
        self.decoder = decoder.eval()
        self.multimask_output = multimask_output

    def _embed_points(self, coords: Tensor, labels: Tensor) -> Tensor:
        """``[B, N, 2]`` model-input-frame points, ``[B, N]`` labels -> sparse embeddings ``[B, N, C]``
        (SAM's ``PromptEncoder._embed_points``/``_embed_boxes`` in masked arithmetic)."""
        pe = self.decoder.prompt_encoder
        size = torch.tensor([pe.input_image_size[1], pe.input_image_size[0]], dtype=coords.dtype)
        emb = pe.pe_layer._pe_encoding((coords + 0.5) / size)
        lab = labels.unsqueeze(-1)
        emb = emb * (lab != -1).to(emb.dtype) + pe.not_a_point_embed.weight * (lab == -1).to(emb.dtype)
        for i in range(pe.num_point_embeddings):
            emb = emb + pe.point_embeddings[i].weight * (lab == i).to(emb.dtype)
        return emb

    def _embed_mask(self, mask_input: Tensor, has_mask_input: Tensor) -> Tensor:
        pe = self.decoder.prompt_encoder
        g = pe.image_embedding_size
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, g[0], g[1])
        flag = has_mask_input.reshape(-1, 1, 1, 1)
        return flag * pe.mask_downscaling(mask_input) + (1 - flag) * no_mask

    def forward(self, image_embeddings: Tensor, point_coords: Tensor, point_labels: Tensor, mask_input: Tensor,
                has_mask_input: Tensor) -> tuple[Tensor, Tensor]:
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_mask(mask_input, has_mask_input)
        dec = self.decoder
        res = decode_with_alpha(dec.mask_decoder, image_embeddings, dec.prompt_encoder.get_dense_pe(), sparse, dense,
                                self.multimask_output, transformer=dec.transformer)
        return res.iou_pred, res.low_res_logits


def onnx_inputs(prompt: Prompt, embedding: Tensor, lowres_side: int) -> dict[str, np.ndarray]:
    """A model-input-frame :class:`Prompt` + embedding ``[C, g, g]`` -> the exported graph's inputs
    (SAM's convention: box corners as labels 2 and 3, a padding point when there is no box)."""
    coords: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    if prompt.points is not None:
        coords.append(prompt.points)
        labels.append(prompt.point_labels.astype(np.float32))  # type: ignore[union-attr]
    if prompt.box is not None:
        coords.append(prompt.box.reshape(2, 2))
        labels.append(np.array([2, 3], np.float32))
    else:
        coords.append(np.zeros((1, 2), np.float32))
        labels.append(np.array([-1], np.float32))
    mask = np.zeros((1, 1, lowres_side, lowres_side), np.float32)
    if prompt.mask_input is not None:
        mask[0, 0] = prompt.mask_input
    return {
        "image_embeddings": embedding.detach().cpu().float().numpy()[None],
        "point_coords": np.concatenate(coords)[None].astype(np.float32),
        "point_labels": np.concatenate(labels)[None].astype(np.float32),
        "mask_input": mask,
        "has_mask_input": np.array([float(prompt.mask_input is not None)], np.float32),
    }


def export_onnx(decoder: PromptableDecoder, out: Path, *, multimask_output: bool = False, opset: int = OPSET) -> Path:
    """Write ``decoder`` (any method, plugins included) as an ONNX graph at ``out``; returns ``out``."""
    model = OnnxPromptDecoder(decoder, multimask_output=multimask_output)
    pe = decoder.prompt_encoder
    g = pe.image_embedding_size
    example = (
        torch.randn(1, pe.embed_dim, g[0], g[1]),
        torch.randint(0, pe.input_image_size[0], (1, 3, 2)).float(),
        torch.tensor([[1.0, 0.0, -1.0]]),
        torch.zeros(1, 1, 4 * g[0], 4 * g[1]),
        torch.zeros(1),
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    # The tracer warns that shape checks become constants: they are, by design (the grid is fixed per base).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model, example, str(tmp), input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                          dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
                          opset_version=opset, dynamo=False)
    tmp.replace(out)
    return out


def parity(predictor: "Predictor", path: Path) -> float:
    """Largest |logit| difference between onnxruntime and PyTorch on a box and a 2-point prompt."""
    import onnxruntime as ort  # noqa: PLC0415

    from pipeline.inference.prompts import collate  # noqa: PLC0415

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    side = predictor.img_size
    emb = torch.randn(predictor.model.prompt_encoder.embed_dim, *predictor.grid,
                      generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for prompt in (Prompt(box=[0.1 * side, 0.2 * side, 0.7 * side, 0.8 * side]),
                   Prompt(points=[[0.4 * side, 0.5 * side], [0.1 * side, 0.1 * side]], point_labels=[1, 0])):
        _scores, low = session.run(None, onnx_inputs(prompt, emb, 4 * predictor.grid[0]))
        with torch.no_grad():
            want = predictor.decode(emb[None].to(predictor.device), collate([prompt], predictor.device))
        worst = max(worst, float(np.abs(low - want.low_res_logits.cpu().numpy()).max()))
    return worst


def run_export_onnx(method: str, out: Path, *, plugin: Path | None = None, base: Path = Path("models/base"),
                    multimask: bool = False, tolerance: float = 1e-3) -> dict[str, Any]:
    """The ``export_onnx`` command: export ``method`` (plugin default ``models/plugins/<method>.pt``) to ``out``.

    The graph is written next to ``out`` first and checked in onnxruntime against PyTorch (single-mask
    export only); ``out`` appears only when the largest logit difference is within ``tolerance``.
    """
    from pipeline.common.cli import StageError  # noqa: PLC0415
    from pipeline.inference.predictor import Predictor  # noqa: PLC0415

    out = Path(out)
    plugin = Path(plugin) if plugin is not None else Path("models/plugins") / f"{method}.pt"
    predictor = Predictor.from_pretrained(base, method, plugin if plugin.is_file() else None, device="cpu")
    staged = out.with_name(f".{out.name}.check.onnx")
    try:
        export_onnx(predictor.decoder, staged, multimask_output=multimask)
        diff = parity(predictor, staged) if not multimask else float("nan")
        if diff > tolerance:
            raise StageError(f"{out}: onnxruntime and PyTorch differ by {diff:.2e} > --tolerance {tolerance}; "
                             "not written (check the opset and the method's ops, or raise --tolerance)")
        staged.replace(out)
    finally:
        staged.unlink(missing_ok=True)
    summary = {"method": method, "out": str(out), "bytes": out.stat().st_size, "max_abs_logit_diff_vs_torch": diff}
    print(json.dumps(summary))
    return summary


__all__ = ["INPUT_NAMES", "OPSET", "OUTPUT_NAMES", "OnnxPromptDecoder", "export_onnx", "onnx_inputs", "parity",
           "run_export_onnx"]
