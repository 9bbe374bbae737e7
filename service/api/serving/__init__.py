"""The data plane's gRPC edge: Predict, Feedback and model status (InferenceService), and
TF Serving's PredictionService. The only part of ``service.api`` that imports TensorFlow."""
