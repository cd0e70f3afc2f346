"""A CLIP as an MLflow pyfunc model: images (encoded PNG or JPEG bytes) and class names in, one column of
class probabilities per class name out.

MLflow executes this file when it loads the model ("models from code"), with agft_core shipped beside it
(pipeline/registry.py logs both), so it imports nothing else of the project and loads wherever torch and
open_clip are installed.
"""

from __future__ import annotations

import io

import mlflow
import pandas as pd
import torch
from PIL import Image

from agft_core.datasets import pixel_transform
from agft_core.evaluate import ZeroShotClassifier
from agft_core.model import ImageEncoder, class_text_embeddings, create_clip, logit_scale


class ClipZeroShotModel(mlflow.pyfunc.PythonModel):
    """model_config: arch, templates (the prompt templates, "{}" for the class name) and classnames (used
    when a request names none); artifacts: clip (the CLIP's weights, image tower fine-tuned or not)."""

    def load_context(self, context) -> None:
        config = context.model_config
        self.arch, self.templates, self.classnames = config["arch"], config["templates"], config["classnames"]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.clip = create_clip(self.arch, context.artifacts["clip"]).to(self.device)
        self.encoder = ImageEncoder.from_clip(self.clip)
        self.transform = pixel_transform(self.encoder.size)

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        classnames = list((params or {}).get("classnames") or self.classnames)
        pixels = torch.stack([self.transform(Image.open(io.BytesIO(image))) for image in model_input["image"]])
        text = class_text_embeddings(self.clip, self.arch, classnames, self.templates)
        classifier = ZeroShotClassifier(self.encoder, text, logit_scale(self.clip))
        probabilities = classifier(pixels.to(self.device)).softmax(dim=-1).cpu().numpy()
        return pd.DataFrame(probabilities, columns=classnames)


mlflow.models.set_model(ClipZeroShotModel())
