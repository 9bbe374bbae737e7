"""fitserve server: the gRPC API (control plane) and the inference server (data plane)."""
