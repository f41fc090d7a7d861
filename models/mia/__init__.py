"""Make-It-Animatable rigging: networks, skeleton, pipeline and glTF output (pure torch)."""
