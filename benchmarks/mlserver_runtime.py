"""An MLServer runtime serving this project's LiteRT classifier: the calibrated probabilities of
`/v2/models/{name}/infer` with input `images` (UINT8 [N, 32, 32, 3]), as this service answers
them without MC dropout. Loaded by MLServer (its own venv, `benchmarks.mlserver_comparison`),
never by the service; `parameters.uri` in model-settings.json is the artifact folder."""

from __future__ import annotations

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

from models.calibration import softmax
from models.litert_classifier import LiteRTClassifier


class LiteRTCalibratedClassifier(MLModel):
    async def load(self) -> bool:
        _, self._classifier = LiteRTClassifier.from_artifact(await get_model_uri(self._settings))
        self._classifier.features(np.zeros((1, 32, 32, 3), np.uint8))   # warm-up, as the service does
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.uint8, copy=False)
        clf = self._classifier
        probabilities = softmax(clf.logits(x), clf.temperature).astype(np.float32)
        return InferenceResponse(model_name=self.name, model_version=self.version,
                                 outputs=[NumpyCodec.encode_output("probabilities", probabilities)])
