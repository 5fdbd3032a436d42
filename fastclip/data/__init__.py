"""Data sources. Each returns torch Datasets plus what evaluation needs (class names, templates)."""
