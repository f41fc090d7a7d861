"""Running the pack without ComfyUI: `python -m slipstream` (cli.py) executes API-format workflows
of our nodes in the standalone host (graph.py), with stand-ins for the few core nodes the examples
use (core_nodes.py), the CPU demos (demos.py) and workflow migration from older packs (migrate.py).
"""
