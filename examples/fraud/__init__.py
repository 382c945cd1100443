"""The card-transaction fraud-scoring demo (``streamscore demo``): seeded synthetic data (``data``), its model
(``model``, needs the ``[demo]`` extra), its requests (``requests``) and the end-to-end run (``run``)."""
