"""Building blocks more than one model family uses (Wan 2.1, Anima, umT5, Qwen3), written once."""
