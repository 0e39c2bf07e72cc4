"""The MLflow model of a trained method: image + prompt in, mask out (an MLflow ``pyfunc``).

The registered ``stable-sam`` model is a :class:`PromptToMask` python model whose artifacts are the frozen
base (``models/base``: ``sam.pt`` + ``base.json``) and the method's plugin file; it segments through
:class:`pipeline.inference.Predictor`, so it gives the masks of the CLI and of the evaluation. One row per
request, all columns strings (so that ``mlflow models serve`` takes plain JSON):

| column | content |
|---|---|
| ``image`` | the image file's bytes (JPEG/PNG/...), base64 |
| ``box`` | ``"[x0, y0, x1, y1]"`` in image pixels, or ``""`` |
| ``points`` | ``"[[x, y], ...]"``, or ``""`` |
| ``labels`` | ``"[1, 0, ...]"`` (1 foreground, 0 background; default all 1), or ``""`` |

Output rows: ``mask_rle`` (COCO RLE ``counts`` string; decode with ``pipeline.data.rle.decode(counts, h, w)``
or pycocotools), ``height``, ``width``, ``area``, ``score`` (SAM's predicted IoU), ``alpha1`` (DRP's weight
of the deformed features; NaN without DRP).

    import mlflow
    m = mlflow.pyfunc.load_model("models:/stable-sam@champion")
    m.predict(pandas.DataFrame([{"image": b64, "box": "[10, 20, 120, 160]", "points": "", "labels": ""}]))
"""
from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

INPUT_COLUMNS = ("image", "box", "points", "labels")
OUTPUT_COLUMNS = ("mask_rle", "height", "width", "area", "score", "alpha1")


def encode_image_file(path: str | Path) -> str:
    """An image file -> the base64 string the ``image`` column takes."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _decode_image(text: str, row: int) -> np.ndarray:
    from PIL import Image

    from pipeline.data.images import image_to_rgb

    try:
        return image_to_rgb(Image.open(io.BytesIO(base64.b64decode(text, validate=True))))
    except Exception as exc:
        raise ValueError(f"row {row}: 'image' is not a base64-encoded image file ({type(exc).__name__}: {exc})") from None


def _json_field(value: Any, name: str, row: int) -> Any:
    if value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise ValueError(f"row {row}: {name!r} must be JSON, e.g. '[10, 20, 120, 160]', got {value!r}") from None


class PromptToMask(mlflow.pyfunc.PythonModel):
    """pyfunc: DataFrame of requests (see the module docstring) -> DataFrame of masks."""

    def load_context(self, context: Any) -> None:
        from pipeline.inference.predictor import Predictor

        cfg = context.model_config or {}
        plugin = context.artifacts.get("plugin") or None
        self.predictor = Predictor.from_pretrained(context.artifacts["base"], cfg.get("method", "stable_sam"), plugin,
                                                   device=cfg.get("device", "auto"))

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the loaded predictor: MLflow pickles the model after running the input example through
        it, and the base weights are already an artifact (they would be stored twice: 375 MB more for vit_b)."""
        return {k: v for k, v in self.__dict__.items() if k != "predictor"}

    def predict(self, context, model_input, params=None):  # noqa: ANN001,ANN201 - MLflow reads type hints as a schema
        import pandas as pd

        from pipeline.data import rle
        from pipeline.inference.requests import check_inside, make_prompt

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = [c for c in ("image",) if c not in frame.columns]
        if missing:
            raise ValueError(f"input needs the columns {list(INPUT_COLUMNS)} (missing {missing})")
        out = []
        last_image: str | None = None
        image = np.zeros((0, 0, 3), np.uint8)
        for i, row in enumerate(frame.to_dict("records")):
            if row["image"] != last_image:
                image = _decode_image(row["image"], i)
                self.predictor.set_image(image)
                last_image = row["image"]
            points = _json_field(row.get("points"), "points", i) or []
            labels = _json_field(row.get("labels"), "labels", i)
            labels = [1] * len(points) if labels is None else labels
            if len(labels) != len(points):
                raise ValueError(f"row {i}: {len(points)} points but {len(labels)} labels")
            pos = [p for p, lab in zip(points, labels) if int(lab) == 1]
            neg = [p for p, lab in zip(points, labels) if int(lab) != 1]
            prompt = make_prompt(_json_field(row.get("box"), "box", i), pos, neg)
            check_inside(prompt, image.shape[:2], f"row {i}")
            masks, scores, _ = self.predictor.predict(point_coords=prompt.points, point_labels=prompt.point_labels,
                                                      box=prompt.box, multimask_output=False)
            alpha = self.predictor.last_alpha1
            out.append({"mask_rle": rle.encode(masks[0]), "height": int(image.shape[0]), "width": int(image.shape[1]),
                        "area": int(masks[0].sum()), "score": float(scores[0]),
                        "alpha1": float("nan") if alpha is None else float(alpha[0])})
        return pd.DataFrame(out, columns=list(OUTPUT_COLUMNS))


@dataclass
class ServingModel:
    """Everything ``Tracker.log_pyfunc_model`` needs to log one method as an MLflow model."""

    python_model: Any
    artifacts: dict[str, str]
    model_config: dict[str, Any]
    input_example: Any  # a pandas DataFrame of one request


def example_request(base_dir: Path) -> Any:
    """A one-row input example: a small generated scene with a box prompt (the model's own input format)."""
    import pandas as pd
    from PIL import Image

    from pipeline.data.synthetic import generate_sample

    sample = generate_sample(np.random.default_rng(0), "salient", 96, 128, 1)
    ys, xs = np.nonzero(sample.target)
    buf = io.BytesIO()
    Image.fromarray(sample.image).save(buf, format="PNG")
    box = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    return pd.DataFrame([{"image": base64.b64encode(buf.getvalue()).decode("ascii"), "box": json.dumps(box),
                          "points": "", "labels": ""}])


def build_serving_model(method: str, base_dir: str | Path, plugin_path: str | Path | None) -> ServingModel:
    """The :class:`ServingModel` of ``method`` (its plugin file checked now, not at serving time)."""
    from pipeline.inference.predictor import Predictor

    base_dir = Path(base_dir)
    plugin = Path(plugin_path) if plugin_path is not None and Path(plugin_path).is_file() else None
    Predictor.from_pretrained(base_dir, method, plugin, device="cpu")  # fails now, naming the file, if unusable
    artifacts = {"base": str(base_dir)}
    if plugin is not None:
        artifacts["plugin"] = str(plugin)
    return ServingModel(PromptToMask(), artifacts, {"method": method}, example_request(base_dir))


__all__ = ["INPUT_COLUMNS", "OUTPUT_COLUMNS", "PromptToMask", "ServingModel", "build_serving_model",
           "encode_image_file", "example_request"]
