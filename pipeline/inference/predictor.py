"""``Predictor``: a trained method behind ``segment_anything.SamPredictor``'s calls.

Set an image once (or a cached embedding), then prompt it many times::

    from pipeline.inference import Predictor
    p = Predictor.from_pretrained("models/base", method="stable_sam", plugin="models/plugins/stable_sam.pt")
    p.set_image(rgb_uint8_hwc)
    masks, scores, low_res = p.predict(box=np.array([x0, y0, x1, y1]), multimask_output=False)
    p.last_alpha1          # DRP's weight of the deformed features for that prompt (None without DRP)

It is the one prompt-to-mask path of the project: evaluation (:meth:`predict_prompts`), the training
sanity check, the CLI (``python -m stages.predict``), the MLflow model and the ONNX parity test all
decode through :meth:`decode` and post-process with :meth:`postprocess`. For method ``sam`` it returns what
``SamPredictor`` returns on the same checkpoint and inputs (``tests/test_predictor.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from segment_anything.modeling import Sam

from pipeline.inference.prompts import Prompt, collate, group_by_signature
from pipeline.modeling.methods import DecoderOutput, PromptableDecoder, PromptBatch, build_method
from pipeline.modeling.transforms import Postprocess, postprocess_logits, preprocess, to_input_coords

# Post-processed float logits of at most this many pixels (all masks of a chunk together) at once.
POST_PIXELS = 1 << 26


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error naming the fix."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but no GPU is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` is a CPU whose instructions do bf16 matmuls natively (AVX512-BF16 or AMX), where bf16
    autocast is measured faster than fp32 (README "Benchmarks"); False for any other device or CPU."""
    if device.type != "cpu":
        return False
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(check()) for check in checks if check is not None)


def resolve_bf16(setting: bool | str, device: torch.device) -> bool:
    """``evaluate.bf16``: ``True``/``False`` as given; ``"auto"`` = :func:`native_bf16` (CUDA: off, unmeasured)."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"bf16 must be true, false or 'auto', got {setting!r}")
    return native_bf16(device)


@dataclass
class MaskChunk:
    """Masks of some prompts of one image: ``indices`` into the prompts given, bool ``masks [n, H, W]``
    at the original size (on the predictor's device), SAM's predicted IoU ``scores [n]``, DRP's ``alpha1 [n]``
    (None without DRP) and the ``low_res`` logits ``[n, 4g, 4g]``."""

    indices: list[int]
    masks: torch.Tensor
    scores: np.ndarray
    alpha1: Optional[np.ndarray]
    low_res: torch.Tensor


class Predictor:
    """A frozen SAM + one method of the registry, used like ``SamPredictor``."""

    def __init__(self, sam: Sam, decoder: PromptableDecoder, *, postprocess: Postprocess = "sam",
                 info: Optional[dict[str, Any]] = None, bf16: bool = False) -> None:
        """``sam``: the frozen base (its image encoder); ``decoder``: :func:`build_method` around it, weights loaded;
        ``bf16``: run the decoder under bf16 autocast (outputs are returned in float32; ``evaluate.bf16``)."""
        self.model = sam
        self.decoder = decoder.eval()
        self.bf16 = bool(bf16)
        self.mode: Postprocess = postprocess
        self.info = dict(info or {})
        self.img_size = int(sam.image_encoder.img_size)
        self.grid = tuple(int(g) for g in sam.prompt_encoder.image_embedding_size)
        self.last_alpha1: Optional[np.ndarray] = None
        self.reset_image()

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def from_pretrained(cls, base_dir: str | Path, method: str = "stable_sam", plugin: str | Path | None = None, *,
                        device: str | torch.device = "auto", plugin_cfg: Any = None,
                        postprocess: Postprocess = "sam", bf16: bool = False) -> "Predictor":
        """Load ``base_dir`` (the ``base`` stage's folder) and ``method`` with its trained ``plugin`` file.

        The plugin architecture (``plugin`` params) comes from ``plugin_cfg`` or else from the plugin file's
        stored config, so a file keeps working after ``params.yaml`` changes. ``sam`` needs no plugin file.
        """
        from pipeline.config import PluginConfig, load_params
        from pipeline.modeling.backbones import load_base
        from pipeline.modeling.plugin_file import read_plugin_file

        sam, info = load_base(Path(base_dir))
        ckpt = None
        if plugin is not None:
            ckpt = read_plugin_file(Path(plugin), method, str(info.get("checkpoint_sha256", "")))
        if plugin_cfg is None:
            stored = (ckpt or {}).get("config", {}).get("plugin")
            plugin_cfg = PluginConfig(**stored) if stored else load_params().plugin
        decoder = build_method(method, sam, plugin_cfg)
        if decoder.num_trainable > 0:
            if ckpt is None:
                raise FileNotFoundError(f"method {method!r} has trained weights: pass its plugin file "
                                        f"(models/plugins/{method}.pt after `dvc repro train@{method}`)")
            decoder.load_plugin_state_dict(ckpt["state_dict"])
        return cls(sam, decoder, postprocess=postprocess, info=info, bf16=bf16).to(device)

    def to(self, device: str | torch.device) -> "Predictor":
        dev = resolve_device(device)
        self.model.to(dev)
        self.decoder.to(dev)
        if self.features is not None:
            self.features = self.features.to(dev)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.device

    @property
    def method(self) -> str:
        return self.decoder.name

    # ------------------------------------------------------------------------------------- images
    def reset_image(self) -> None:
        self.features: Optional[torch.Tensor] = None  # [1, C, g, g]
        self.original_size: Optional[tuple[int, int]] = None
        self.input_size: Optional[tuple[int, int]] = None
        self.is_image_set = False

    @torch.inference_mode()
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encode ``image`` (uint8 ``HxWx3``, ``RGB`` or ``BGR``) once for the prompts that follow."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"set_image expects a uint8 HxWx3 array, got {got}")
        if image_format == "BGR":
            image = image[..., ::-1]
        x, input_hw = preprocess(image, self.img_size, self.mode)
        features = self.model.image_encoder(x[None].to(self.device))
        self.set_embedding(features[0], tuple(image.shape[:2]), input_hw)  # type: ignore[arg-type]

    def set_embedding(self, embedding: torch.Tensor, original_size: tuple[int, int],
                      input_size: tuple[int, int] | None = None) -> None:
        """Use a precomputed embedding ``[C, g, g]`` (the cache's) for an image of ``original_size`` (H, W)."""
        if embedding.dim() == 4 and embedding.shape[0] == 1:
            embedding = embedding[0]
        want = (int(self.model.prompt_encoder.embed_dim), *self.grid)
        if tuple(embedding.shape) != want:
            raise ValueError(f"embedding must be {want} for this base model, got {tuple(embedding.shape)}: "
                             "embeddings of another SAM variant?")
        from pipeline.modeling.transforms import input_size as _input_size

        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = tuple(input_size) if input_size is not None else _input_size(self.original_size, self.img_size, self.mode)  # type: ignore[assignment]
        self.features = embedding.to(self.device, torch.float32)[None]
        self.is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        """The current embedding ``[1, C, g, g]`` (as ``SamPredictor.get_image_embedding``)."""
        return self._features()

    def _features(self) -> torch.Tensor:
        if self.features is None:
            raise RuntimeError("no image is set: call set_image(...) or set_embedding(...) first")
        return self.features

    # ---------------------------------------------------------------------------------- decoding
    def decode(self, embeddings: torch.Tensor, prompts: PromptBatch, multimask_output: bool = False) -> DecoderOutput:
        """The decoder call every path shares: ``embeddings [B, C, g, g]`` (one per row), model-input-frame
        ``prompts`` -> :class:`DecoderOutput` (low_res_logits ``[B, M, 4g, 4g]``, iou_pred ``[B, M]``, alpha).

        With ``bf16`` the decoder runs under bf16 autocast and its outputs come back as float32."""
        if not self.bf16:
            return self.decoder(embeddings, prompts, multimask_output=multimask_output)
        with torch.autocast(device_type=embeddings.device.type, dtype=torch.bfloat16):
            out = self.decoder(embeddings, prompts, multimask_output=multimask_output)
        return DecoderOutput(out.low_res_logits.float(), out.iou_pred.float(),
                             None if out.alpha is None else out.alpha.float())

    def postprocess(self, low_res: torch.Tensor, input_size: tuple[int, int] | None = None,
                    original_size: tuple[int, int] | None = None) -> torch.Tensor:
        """``[B, M, 4g, 4g]`` logits -> ``[B, M, H, W]`` logits at the original size of the current image (or of
        an image given by ``input_size`` (after resizing, before padding) and ``original_size``)."""
        input_size = input_size or self.input_size
        original_size = original_size or self.original_size
        if original_size is None or input_size is None:
            raise RuntimeError("no image is set: call set_image(...) or set_embedding(...) first")
        return postprocess_logits(low_res, input_size, original_size, self.img_size, mode=self.mode)

    # ------------------------------------------------------------------------- SamPredictor API
    @torch.inference_mode()
    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One prompt in the ORIGINAL image's pixel frame, as ``SamPredictor.predict``.

        point_coords ``[N, 2]`` (x, y), point_labels ``[N]`` (1 fg, 0 bg), box ``[4]`` XYXY, mask_input
        ``[1, 4g, 4g]`` logits (e.g. a previous ``low_res`` output). Returns (masks ``[M, H, W]`` bool, or
        float logits with ``return_logits``; scores ``[M]``; low_res logits ``[M, 4g, 4g]``), M = 3 or 1.
        """
        self._features()
        if point_coords is not None and point_labels is None:
            raise ValueError("point_labels must be given with point_coords")
        mask = None if mask_input is None else np.asarray(mask_input, dtype=np.float32).reshape(mask_input.shape[-2:])
        prompt = Prompt(box=box, points=point_coords, point_labels=point_labels, mask_input=mask)
        batch = collate([prompt.in_input_frame(self.original_size, self.img_size, self.mode)], self.device)  # type: ignore[arg-type]
        masks, scores, low_res = self._predict_batch(batch, multimask_output, return_logits)
        return masks[0].cpu().numpy(), scores[0].float().cpu().numpy(), low_res[0].float().cpu().numpy()

    @torch.inference_mode()
    def predict_torch(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """B prompts for the current image, already in the MODEL-INPUT frame (``apply_coords``), as
        ``SamPredictor.predict_torch``: point_coords ``[B, N, 2]``, point_labels ``[B, N]``, boxes ``[B, 4]``,
        mask_input ``[B, 1, 4g, 4g]`` -> (masks ``[B, M, H, W]``, scores ``[B, M]``, low_res ``[B, M, 4g, 4g]``)."""
        self._features()
        dev = self.device
        batch = PromptBatch(
            boxes=None if boxes is None else boxes.to(dev, torch.float32),
            points=None if point_coords is None else point_coords.to(dev, torch.float32),
            point_labels=None if point_labels is None else point_labels.to(dev, torch.int64),
            mask_inputs=None if mask_input is None else mask_input.to(dev, torch.float32),
        )
        return self._predict_batch(batch, multimask_output, return_logits)

    def _predict_batch(self, batch: PromptBatch, multimask_output: bool,
                       return_logits: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = next(t.shape[0] for t in (batch.boxes, batch.points, batch.mask_inputs) if t is not None)
        out = self.decode(self._features().expand(rows, -1, -1, -1), batch, multimask_output)
        self.last_alpha1 = None if out.alpha is None else out.alpha[:, 0].float().cpu().numpy()
        masks = self.postprocess(out.low_res_logits)
        if not return_logits:
            masks = masks > 0.0
        return masks, out.iou_pred, out.low_res_logits

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """``[..., 2]`` (x, y) or ``[..., 4]`` boxes of the current image -> the model-input frame."""
        if self.original_size is None:
            raise RuntimeError("no image is set: call set_image(...) or set_embedding(...) first")
        return to_input_coords(coords, self.original_size, self.img_size, self.mode)

    # ----------------------------------------------------------------------- many stored prompts
    @torch.inference_mode()
    def predict_prompts(self, prompts: Sequence[Prompt], *, batch_size: int = 64,
                        max_pixels: int = POST_PIXELS) -> Iterator[MaskChunk]:
        """Single-mask output for many prompts of the current image (original pixel frame).

        Prompts are grouped by signature (no padding tokens), decoded ``batch_size`` at a time and
        post-processed to the original size in sub-chunks of at most ``max_pixels`` pixels, so memory stays
        bounded even for 20-megapixel images. Yields :class:`MaskChunk` s covering every prompt once.
        """
        feats = self._features()
        h, w = self.original_size  # type: ignore[misc]
        post_step = max(1, max_pixels // max(1, h * w))
        for _sig, members in group_by_signature(prompts):
            for start in range(0, len(members), batch_size):
                idx = members[start : start + batch_size]
                batch = collate([prompts[i].in_input_frame((h, w), self.img_size, self.mode) for i in idx], self.device)
                out = self.decode(feats.expand(len(idx), -1, -1, -1), batch, multimask_output=False)
                low = out.low_res_logits[:, :1]
                scores = out.iou_pred[:, 0].float().cpu().numpy()
                alpha = None if out.alpha is None else out.alpha[:, 0].float().cpu().numpy()
                for s in range(0, len(idx), post_step):
                    sl = slice(s, s + post_step)
                    masks = self.postprocess(low[sl])[:, 0] > 0
                    yield MaskChunk(idx[sl], masks, scores[sl], None if alpha is None else alpha[sl], low[sl, 0])


__all__ = ["MaskChunk", "POST_PIXELS", "Predictor", "resolve_device"]
