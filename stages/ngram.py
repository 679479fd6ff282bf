"""The n-gram model (TF-IDF + logistic regression) saved without pickle: a JSON vocabulary and safetensors arrays.

fine_tune trains it on every run as the no-transfer baseline. When `fine_tune.blend` gives it a weight, the model
folder keeps a copy in `ngram/` and the served classifier mixes its probabilities into the encoder's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import normalize

CONFIG_FILE, WEIGHTS_FILE = "ngram.json", "ngram.safetensors"
UNBLENDED = "unblended"  # predictions' columns for the transferred model before the blend
# The tokenisation settings a CountVectorizer needs to count exactly as the fitted TfidfVectorizer did.
COUNTING = ("analyzer", "token_pattern", "strip_accents", "lowercase", "ngram_range", "binary", "stop_words")


def save_ngram(pipeline: Pipeline, folder: Path) -> None:
    """Write a fitted TfidfVectorizer -> LogisticRegression pipeline (as fit_baseline builds it) to `folder`."""
    vectorizer, classifier = pipeline[0], pipeline[-1]
    if not isinstance(vectorizer, TfidfVectorizer) or not isinstance(classifier, LogisticRegression):
        raise TypeError(f"save_ngram needs TfidfVectorizer -> LogisticRegression, got {pipeline}")
    counting = {k: vectorizer.get_params()[k] for k in COUNTING}
    if callable(counting["analyzer"]) or vectorizer.preprocessor or vectorizer.tokenizer or not vectorizer.use_idf:
        raise TypeError("save_ngram stores settings, not code: custom analyzer, preprocessor or tokenizer, and "
                        "use_idf=False, are not supported")
    folder.mkdir(parents=True, exist_ok=True)
    config = {"counting": counting, "sublinear_tf": vectorizer.sublinear_tf, "norm": vectorizer.norm,
              "vocabulary": {term: int(i) for term, i in vectorizer.vocabulary_.items()}}
    (folder / CONFIG_FILE).write_text(json.dumps(config, sort_keys=True) + "\n", encoding="utf-8")
    arrays = {"idf": vectorizer.idf_, "coef": classifier.coef_, "intercept": classifier.intercept_}
    # safetensors writes the raw buffer: a Fortran-ordered coef_ (multiclass) must be made C-ordered first
    save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}, str(folder / WEIGHTS_FILE))


def _softmax(scores: np.ndarray) -> np.ndarray:
    exp = np.exp(scores - scores.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


class NgramModel:
    """`predict_proba(texts)` of a saved n-gram model, equal to the fitted pipeline's."""

    def __init__(self, folder: Path) -> None:
        config = json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
        counting = config["counting"] | {"ngram_range": tuple(config["counting"]["ngram_range"])}
        self.counts = CountVectorizer(**counting, vocabulary=config["vocabulary"])
        self.sublinear_tf, self.norm = bool(config["sublinear_tf"]), config["norm"]
        arrays = load_file(str(Path(folder) / WEIGHTS_FILE))
        self.idf, self.coef, self.intercept = arrays["idf"], arrays["coef"], arrays["intercept"]

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        tf = self.counts.transform(texts).astype(np.float64)
        if self.sublinear_tf:
            np.log(tf.data, out=tf.data)
            tf.data += 1.0
        tfidf = tf.multiply(self.idf).tocsr()
        if self.norm:
            tfidf = normalize(tfidf, norm=self.norm)
        scores = np.asarray(tfidf @ self.coef.T) + self.intercept  # a sparse matrix product gives np.matrix
        if scores.shape[1] == 1:  # binary: LogisticRegression's one score is the positive class's logit
            positive = 1.0 / (1.0 + np.exp(-scores[:, 0]))
            return np.column_stack([1.0 - positive, positive])
        return _softmax(scores)
