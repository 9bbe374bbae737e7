"""The gRPC edge: servicers, converters and status mapping. The only place with grpc."""
