"""A search with Ray Tune: the driver, Ray itself (cluster), the data on every node (nodes) and where
trial folders live (storage)."""
