"""The domain: request types, model building, training, and the stores. No transport here."""
