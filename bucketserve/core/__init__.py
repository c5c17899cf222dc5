"""The scheduling core: requests, memory accounting and policies.

Pure Python by contract: nothing here imports torch, asyncio or does I/O, so that the same
policy objects drive the real engine and the simulator.
"""
