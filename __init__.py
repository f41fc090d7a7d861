"""Slipstream — ComfyUI nodes for running heavy diffusion and video models on ordinary GPUs.

ComfyUI imports this folder from custom_nodes/<any name>/; everything inside is imported
relatively. Nothing here but registration.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
