"""The MLflow pyfunc, logged as code (no pickle): a column `text` in; `label` and `prob_<class>` out."""

from __future__ import annotations

import os

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext


class TextClassifierModel(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from stages.model import TextClassifier

        self.classifier = TextClassifier(context.artifacts["model"], backbone=context.artifacts.get("encoder"))

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if "text" not in model_input.columns:
            raise ValueError(f"input needs a column 'text'; got columns {list(model_input.columns)}")
        from stages.texts import bad_rows, blank, normalise_text, not_text

        missing = blank(model_input["text"].reset_index(drop=True))
        if missing.any():  # a prediction for no text would look like an answer
            rows = bad_rows(missing, ("row(s) (0-based)", [str(i) for i in range(len(missing))]))
            raise MlflowException(f"column 'text' is empty or null in {rows} of {len(missing)}; send text in every "
                                  "row", error_code=INVALID_PARAMETER_VALUE)
        if (other := not_text(model_input["text"].reset_index(drop=True))).any():
            rows = bad_rows(other, ("row(s) (0-based)", [str(i) for i in range(len(other))]))
            raise MlflowException(f"column 'text' holds values that are not text (numbers, lists) in {rows} of "
                                  f"{len(other)}; send strings", error_code=INVALID_PARAMETER_VALUE)
        texts = [normalise_text(text) for text in model_input["text"].astype(str)]  # as ingest read the training text
        proba = self.classifier.predict_proba(texts)
        labels = self.classifier.labels
        out = pd.DataFrame({f"prob_{label}": proba[:, i].astype("float64") for i, label in enumerate(labels)})
        out.insert(0, "label", [labels[i] for i in proba.argmax(axis=1)])
        return out


mlflow.models.set_model(TextClassifierModel())
