"""The DDP training loop (the seed's CNN on handwritten digits by default).

``python -m trainer`` / ``python train.py`` / ``torchrun ... train.py`` all run ``trainer.loop.train``.
"""
