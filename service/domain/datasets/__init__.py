"""Datasets: the content-addressed upload store, sources by URI or URL, their local cache,
and the file formats read without TensorFlow (.npz headers, TFRecord frames)."""
