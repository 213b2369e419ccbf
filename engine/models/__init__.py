"""Model families: ``nn.Module``s and their adapters only (see ``base.Separator``).

How a model is applied to a track (chunking, overlap-add, shifts) lives in ``engine.apply``.
"""
