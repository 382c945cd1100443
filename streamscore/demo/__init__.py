"""The card-transaction fraud-scoring demo: seeded synthetic data (``data``) and its model (``model``)."""
