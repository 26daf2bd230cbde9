"""Nectar data: readers + validation (nectar), chat templates (chat), tokenization (tokenize), synthetic data
(synthetic), the TFDS builder (tfds_nectar) and the tf.data input pipeline (pipeline). See ARCHITECTURE.md."""
