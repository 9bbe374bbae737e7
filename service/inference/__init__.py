"""The data plane: loaded SavedModels, dynamic batching, version management. No grpc."""
