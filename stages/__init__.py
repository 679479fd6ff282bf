"""The seven pipeline stages: ingest, preprocess, extract_features, fine_tune, evaluate, register, deploy."""
